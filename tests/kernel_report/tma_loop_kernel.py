"""A small TMA kernel whose main loop is known, compiled for sm_90 and read by the report's SASS
reader; prints what the reader found as JSON. Run by test_report.py in a subprocess (the tests run
Triton interpreted; this needs the real compiler): `python tests/kernel_report/tma_loop_kernel.py`.

The kernel sums N / 64 tiles of a (N, 64) bf16 matrix loaded through a host-side tensor descriptor:
its loop issues one TMA load and waits on one mbarrier per trip, and stores only after the loop.
ptxas puts the mbarrier try-wait retry stub after EXIT, branching back into the loop."""

from __future__ import annotations

import json
import re

import triton
import triton.language as tl
from triton.compiler import ASTSource

from fastdae.kernel_report.sass import _read_sass, compile_ast


@triton.jit
def tma_tile_sum(desc, out_ptr, N, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for i in range(0, N, BLOCK):
        acc += desc.load([i, 0]).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


def main() -> None:
    signature = {"desc": "tensordesc<bf16[64, 64]>", "out_ptr": "*fp32", "N": "i32", "BLOCK": "constexpr"}
    kernel, _ = compile_ast(ASTSource(tma_tile_sum, signature, {(3,): 64}), 90, num_warps=4, num_stages=3)
    info = _read_sass(kernel.asm["sass"])
    instrs, (lo, hi) = info["instrs"], info["main"]
    loop = [t.split()[0] for t in instrs[lo:hi]]
    exit_at = next(i for i, t in enumerate(instrs) if t.split()[0] == "EXIT")
    # the retry stub: an unconditional branch after EXIT back to a label before it
    labels = {m.group(1): i for i, m in ((i, re.match(r"^BRA\s+`?\(?(\S+)", t)) for i, t in enumerate(instrs)) if m}
    print(
        json.dumps(
            dict(
                has_loop=info["has_loop"],
                loop_len=hi - lo,
                loop_tma=sum(op.startswith("UTMALDG") for op in loop),
                loop_exit=sum(op == "EXIT" for op in loop),
                loop_stores=sum(op.startswith("STG") for op in loop),
                loop_waits=sum(op.startswith("SYNCS.PHASECHK") for op in loop),
                branches_after_exit=sum(i > exit_at for i in labels.values()),
                total=len(instrs),
            )
        )
    )


if __name__ == "__main__":
    main()
