"""Compiling one launch config for a target without a GPU, and reading what it compiled to: ptxas -v
(registers, spills, stack) and the SASS (tensor-core instructions, global loads by width, the main
loop).

Finding the main loop: a loop is a label and a later branch back to it. Not every backward branch is
one: in TMA / mbarrier kernels ptxas puts the try-wait retry stubs after the kernel's EXIT, and each
stub jumps back into the body, so "label .. backward branch" would span nearly the whole kernel (on
Triton's tutorial-06 attention kernel 1,280 instructions where the loop is 522). Spans that contain
an EXIT are therefore not loops, nor are spin-waits (a span of only barrier waits and branches); of
the rest the main loop is the innermost of those with the most MMAs (the longest when none has one).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from fastdae.kernel_report.targets import Target
from fastdae.kernels._launch import KernelLaunch, LaunchConfig

CACHE_DIR = Path(os.environ.get("FASTDAE_REPORT_CACHE", Path.home() / ".cache" / "fastdae" / "kernel-report"))
MMA_OPS = ("HGMMA", "HMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA", "UTCOMMA")  # wgmma, mma.sync, tcgen05.mma
_SPIN_OPS = ("SYNCS", "BRA", "NOP", "YIELD", "NANOSLEEP")  # what an mbarrier retry / spin-wait holds


@dataclass
class Static:
    """What one compiled kernel is, read from ptxas -v and its SASS."""

    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    mma: dict[str, int]  # tensor-core opcodes (with shape and types) -> count in the whole kernel
    dot: str  # how the dots compiled: "HGMMA.F32.BF16", "HMMA.F32.TF32", "FFMA (no tensor cores)", "-"
    loop_loads: dict[str, int]  # main-loop global loads by kind: b128, b64, b32, b16, b8, ldgsts128, tma, ...
    all_loads: dict[str, int]
    loop_instrs: int  # SASS instructions in the main loop (one trip); the whole kernel if it has no loop
    total_instrs: int
    has_loop: bool


def _specialize(plan: KernelLaunch, cfg: LaunchConfig) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) exactly as Triton's JIT specialises the launcher's arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = plan.kernel
    fixed = {**plan.constexprs, **dict(cfg.meta)}
    if plan.pre_hook is not None:  # e.g. a TMA descriptor's block shape, which its type carries
        plan.pre_hook(plan.named_args(dict(cfg.meta)))
    runtime = iter(plan.args)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in fixed:
            signature[name], constexprs[(i,)] = "constexpr", fixed[name]
            continue
        kind, attr = native_specialize_impl(BaseBackend, next(runtime), False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = attr
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v of the kernel's PTX with the flags Triton's backend uses (for Triton cache hits,
    whose log was not printed)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [
            get_ptxas(arch).path,
            "-lineinfo",
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
            str(src),
            "-o",
            str(Path(tmp) / "k.o"),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


_LOAD = re.compile(r"^(LDGSTS|LDG|UTMALDG|UBLKCP)\b(\S*)")


def _load_kind(opcode: str) -> str | None:
    m = _LOAD.match(opcode)
    if m is None:
        return None
    op, mods = m.groups()
    if op in ("UTMALDG", "UBLKCP"):
        return "tma"
    width = "b32"
    for token, w in ((".128", "b128"), (".64", "b64"), (".U16", "b16"), (".S16", "b16"), (".U8", "b8"), (".S8", "b8")):
        if token in mods:
            width = w
            break
    return ("ldgsts_" if op == "LDGSTS" else "") + width


def _read_sass(sass: str) -> dict:
    """Instruction list, loops (label .. backward branch, see the module docstring) and the main
    loop's span [lo, hi)."""
    instrs: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        line = line.strip()
        m = re.match(r"^(\.?L\w+):$", line) or re.match(r"^(LBB\w*):$", line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        if "\t" not in line:
            continue
        text = line.split("\t", 1)[1].strip().rstrip(";")
        if not text:
            continue
        text = re.sub(r"^@!?U?P\w+\s+", "", text)
        instrs.append(text)
    loops = []
    for j, text in enumerate(instrs):
        # a label, or (sm_100's uniform branches) an address: SASS instructions are 16 bytes each
        m = re.match(r"^BRA(?:\.\S+)?\s+(?:!?U?P\w+,\s*)?`?\(?(\.?L\w+|LBB\w*|0x[0-9a-f]+)", text)
        if m is None:
            continue
        target = int(m.group(1), 16) // 16 if m.group(1).startswith("0x") else labels.get(m.group(1), j)
        if target < j:  # backward (a branch to itself is a trap)
            span = (target, j + 1)
            body = instrs[span[0] : span[1]]
            if any(t.split()[0] == "EXIT" for t in body):  # a stub after EXIT jumping back: not a loop
                continue
            if all(t.startswith(_SPIN_OPS) for t in body):  # an mbarrier try-wait spin
                continue
            loops.append(span)

    def mma_count(span) -> int:
        return sum(1 for t in instrs[span[0] : span[1]] if t.startswith(MMA_OPS))

    # the loop with the most MMAs, the innermost of those (a loop around it, e.g. VQ's segments, also
    # holds its MMAs once but runs once per many of its trips); without MMAs the longest
    most = max((mma_count(s) for s in loops), default=0)
    main = (
        min((s for s in loops if mma_count(s) == most), key=lambda s: s[1] - s[0])
        if most
        else max(loops, key=lambda s: s[1] - s[0], default=(0, len(instrs)))
    )
    return dict(instrs=instrs, main=main, has_loop=bool(loops))


def _count_loads(instrs: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in instrs:
        kind = _load_kind(t.split()[0])
        if kind:
            out[kind] = out.get(kind, 0) + 1
    return out


def _dot_kind(mma: dict[str, int], instrs: list[str], has_dot: bool) -> str:
    if any(op.startswith("UTC") for op in mma):  # tcgen05: the opcode does not name the types
        return " ".join(sorted({op.split(".")[0] for op in mma}))
    if mma:
        types = sorted({re.sub(r"^(HGMMA|HMMA)\.\w+", r"\1", op).split(".gsb")[0] for op in mma})
        return " ".join(sorted({re.sub(r"\.(64x\d+x\d+|16816|1688|16832)", "", t) for t in types}))
    return "FFMA (no tensor cores)" if has_dot else "-"


def _source(plan: KernelLaunch, cfg: LaunchConfig, target: Target):
    """(Triton ASTSource, cache key) of one launch config on a target."""
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(plan.kernel, *_specialize(plan, cfg))
    # the reader's own source is part of the key: a change in how SASS is read re-reads every kernel
    key = f"{src.hash()}-{cfg}-{target.arch}-{triton.__version__}-{_reader_hash()}"
    return src, hashlib.sha256(key.encode()).hexdigest()


@functools.cache
def _reader_hash() -> str:
    """Hash of this module (the code that compiles and reads a kernel): changing it re-reads every
    cached kernel."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def compile_ast(src, arch: int, num_warps: int, num_stages: int):
    """triton.compile of an ASTSource for sm_<arch> on this machine: (compiled kernel, ptxas -v log)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton 3.9's FP-fusion default notice
        kernel = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
        )
    text = log.getvalue()
    if "registers" not in text:  # a Triton cache hit prints no log
        text = _ptxas_log(kernel.asm["ptx"], arch)
    return kernel, text


def read_kernel(kernel, ptxas_log: str, name: str) -> Static:
    """Static of a compiled kernel named `name` from its ptxas -v log and SASS."""
    entry = ptxas_log[ptxas_log.find(f"entry function '{name}'") :]  # the kernel's own properties

    def grab(pattern: str) -> int:
        m = re.search(pattern, entry)
        return int(m.group(1)) if m else 0

    sass = _read_sass(kernel.asm["sass"])
    instrs, (lo, hi) = sass["instrs"], sass["main"]
    mma: dict[str, int] = {}
    for t in instrs:
        op = t.split()[0]
        if op.startswith(MMA_OPS):
            mma[op] = mma.get(op, 0) + 1
    ttgir = kernel.asm["ttgir"]
    has_dot = "tt.dot" in ttgir or "warp_group_dot" in ttgir or "tc_gen5_mma" in ttgir
    return Static(
        regs=grab(r"Used (\d+) registers"),
        spill_stores=grab(r"(\d+) bytes spill stores"),
        spill_loads=grab(r"(\d+) bytes spill loads"),
        stack=grab(r"(\d+) bytes stack frame"),
        shared=int(kernel.metadata.shared),
        mma=mma,
        dot=_dot_kind(mma, instrs, has_dot),
        loop_loads=_count_loads(instrs[lo:hi]),
        all_loads=_count_loads(instrs),
        loop_instrs=hi - lo,
        total_instrs=len(instrs),
        has_loop=sass["has_loop"],
    )


def compile_static(plan: KernelLaunch, cfg: LaunchConfig, target: Target) -> Static:
    """Compile one launch config for a target (no GPU needed) and read it; cached on disk."""
    src, key = _source(plan, cfg, target)
    cached = CACHE_DIR / f"{key}.json"
    if cached.exists():
        return Static(**json.loads(cached.read_text()))
    kernel, log = compile_ast(src, target.arch, cfg.num_warps, cfg.num_stages)
    static = read_kernel(kernel, log, plan.name)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(asdict(static)))
    return static
