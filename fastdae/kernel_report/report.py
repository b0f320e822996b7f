"""Static kernel report: every Triton kernel compiled for sm_90 / sm_80 on a machine with no GPU, at
exactly the launch configs the launchers pick, and read as a GPU engineer would.

    python -m fastdae.kernel_report [--targets sm90,sm80] [--out benchmarks/results] [--quick]

For each kernel x shape x config x target it records (from ptxas -v and the SASS of the cubin):
registers, spill bytes, shared memory, blocks per SM, tensor-core instructions (HGMMA = wgmma,
HMMA = mma.sync) and the precision they run at, global loads by width in the main loop
(128-bit / cp.async (LDGSTS) / TMA vs narrower), main-loop instructions per tile, and an
**estimated** time from a simple model next to the roofline. Nothing here is measured.

The model (per kernel launch, on the target's peak figures below):
    tensor  = flops / tensor-core (or FMA) peak at the dot's precision
    issue   = warp instructions / (SMs x 4 schedulers x clock); a program issues its non-loop
              SASS once and its main loop once per tile
    memory  = compulsory bytes (each operand read once, outputs written once) / HBM bandwidth
    est     = max(tensor, issue) x wave quantisation, and at least memory
    roofline = max(flops / peak, bytes / bandwidth)
It ignores latency, L2 traffic, bank conflicts and overlap limits: a lower bound of sorts, good for
comparing configs and spotting 10x problems, not for promising a speed.

Tried and not kept (compile-only, sm_90, D = 64 bf16 forward): K/V through device-side TMA
descriptors as Triton's tutorial 06 does on Hopper gave 189 instead of 224 registers but 995 instead
of 613 main-loop instructions per tile, and device descriptors need a global allocator hook; the
pointer loads (cp.async.128 once aligned) stay until a GPU says otherwise.

Compiling needs the real kernels, not the interpreter: run it without TRITON_INTERPRET (the CI
test starts it in a subprocess). Results are cached per compiled kernel (source hash, signature,
options, target) under ~/.cache/fastdae/kernel-report, so a rerun only compiles what changed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fastdae.kernels._dispatch import triton_interpret
from fastdae.kernels._launch import KernelLaunch, LaunchConfig

CACHE_DIR = Path(os.environ.get("FASTDAE_REPORT_CACHE", Path.home() / ".cache" / "fastdae" / "kernel-report"))


# ---------------------------------------------------------------------------------------------
# Targets and their peak figures (dense, no sparsity; vendor datasheets)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    name: str  # "sm90"
    arch: int  # 90
    gpu: str  # the GPU whose peaks the estimate uses
    sms: int
    clock_ghz: float
    tflops: dict[str, float]  # dot precision -> peak TFLOP/s
    hbm_tbs: tuple[float, ...]  # bandwidths of the target's GPUs (H100, H200)
    smem_per_sm: int = 228 * 1024
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32


# H100 SXM: 132 SMs x 1.83 GHz; bf16 989 TFLOP/s, tf32 495, fp32 FMA 67; HBM3 3.35 TB/s (H200: 4.8).
# A100 SXM: 108 SMs x 1.41 GHz; bf16 312, tf32 156, fp32 19.5; 2.04 TB/s; 164 KB shared per SM.
TARGETS = {
    "sm90": Target(
        "sm90",
        90,
        "H100/H200 SXM",
        132,
        1.83,
        {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "3xtf32": 494.7 / 3, "ieee": 66.9},
        (3.35, 4.8),
    ),
    "sm80": Target(
        "sm80",
        80,
        "A100 SXM 80GB",
        108,
        1.41,
        {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "3xtf32": 52.0, "ieee": 19.5},
        (2.04,),
        smem_per_sm=164 * 1024,
    ),
}


# ---------------------------------------------------------------------------------------------
# Cases: a kernel launch built by the library's own launch functions, plus its work
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    family: str  # "attention_fwd", "vq", ...
    shape: str  # human-readable shape
    dtype: str
    launch: KernelLaunch
    flops: float
    bytes: float
    trips: Callable[[dict], int]  # main-loop iterations of one program for a config's meta
    precision: str  # peak key: bf16 / fp16 / tf32 / 3xtf32 / ieee
    shipped: bool = True  # what impl="auto" launches on CUDA (the CI rules apply to these rows)


def _dt(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _peak_key(dtype: str, dot_precision: str) -> str:
    return dtype if dtype in ("bf16", "fp16") else dot_precision


def attention_cases(quick: bool = False) -> list[Case]:
    """B=8 H=16, N in {1024, 4096}, D in {64, 72, 128}, bf16 and fp32, contiguous and fused-qkv."""
    from fastdae.kernels import attention as A

    B, H = 8, 16
    cases = []
    for D in (64, 72, 128):
        for dtype in ("bf16", "fp32"):
            for layout in ("contiguous", "fused-qkv"):
                for N in (1024,) if quick else (1024, 4096):
                    dt = _dt(dtype)
                    if layout == "contiguous":
                        q, k, v = (torch.empty(B, H, N, D, dtype=dt, device="meta") for _ in range(3))
                    else:  # what the DiT passes: views of one (B, N, 3, H, D) projection
                        q, k, v = torch.empty(B, N, 3, H, D, dtype=dt, device="meta").permute(2, 0, 3, 1, 4).unbind(0)
                    o = torch.empty(B, N, H, D, dtype=dt, device="meta").transpose(1, 2)
                    lse = torch.empty(B, H, N, device="meta")
                    grads = [torch.empty(B, H, N, D, dtype=dt, device="meta") for _ in range(4)]  # do, dq, dk, dv
                    el = q.element_size()
                    io_bytes = B * H * N * D * el
                    bhnmd = B * H * N * N * D
                    prec = A._precision(dt)
                    shipped = A.auto_uses_kernel(q)
                    shape = f"B{B} H{H} N{N} D{D} {layout}"
                    fwd = A.fwd_launch(q, k, v, o, lse, D**-0.5)
                    delta, dkdv, dq = A.bwd_launches(grads[0], q, k, v, o, lse, lse, *grads[1:], D**-0.5)
                    cases += [
                        Case(
                            "attention_fwd",
                            shape,
                            dtype,
                            fwd,
                            4 * bhnmd,
                            4 * io_bytes + 4 * B * H * N,
                            lambda m, N=N: N // m["BLOCK_N"],
                            _peak_key(dtype, prec),
                            shipped,
                        ),
                        Case(
                            "attention_bwd_delta",
                            shape,
                            dtype,
                            delta,
                            2 * B * H * N * D,
                            2 * io_bytes,
                            lambda m: 1,
                            _peak_key(dtype, prec),
                            shipped,
                        ),
                        Case(
                            "attention_bwd_dkdv",
                            shape,
                            dtype,
                            dkdv,
                            8 * bhnmd,
                            6 * io_bytes + 8 * B * H * N,
                            lambda m, N=N: N // m["BLOCK_M"],
                            _peak_key(dtype, prec),
                            shipped,
                        ),
                        Case(
                            "attention_bwd_dq",
                            shape,
                            dtype,
                            dq,
                            6 * bhnmd,
                            5 * io_bytes + 8 * B * H * N,
                            lambda m, N=N: N // m["BLOCK_N"],
                            _peak_key(dtype, prec),
                            shipped,
                        ),
                    ]
    return cases


def vq_cases(quick: bool = False) -> list[Case]:
    """N=65,536 rows, K in {16,384, 65,536} codes, D in {8, 32, 256}, fp32 and bf16, search only and
    the fused vector_quantize pass (writes z_q)."""
    from fastdae.kernels import vq as V

    N = 65536
    cases = []
    for D in (8, 32, 256):
        for dtype in ("bf16", "fp32"):
            for K in (16384,) if quick else (16384, 65536):
                for write_zq in (False, True):
                    dt = _dt(dtype)
                    x = torch.empty(N, D, dtype=dt, device="meta")
                    c = torch.empty(K, D, dtype=dt, device="meta")
                    csq, csq_sum = torch.empty(K, device="meta"), torch.empty((), device="meta")
                    idx = torch.empty(N, dtype=torch.int64, device="meta")
                    dist = torch.empty(N, device="meta")
                    zq = torch.empty(N, D, dtype=dt, device="meta") if write_zq else None
                    plan = V.nearest_launch(x, c, csq, csq_sum, idx, dist, zq)
                    el = x.element_size()
                    nbytes = (N * D + K * D + (N * D if write_zq else 0)) * el + K * 4 + N * 12
                    prec = plan.constexprs["PRECISION"]
                    cases.append(
                        Case(
                            "vector_quantize" if write_zq else "vq_nearest",
                            f"N{N} K{K} D{D}",
                            dtype,
                            plan,
                            2 * N * K * D,
                            nbytes,
                            lambda m, K=K: -(-K // m["BLOCK_K"]),
                            _peak_key(dtype, prec),
                        )
                    )
    return cases


# VGG16 LPIPS taps at 256 px: (C, H = W)
LPIPS_LAYERS = ((64, 256), (128, 128), (256, 64), (512, 32), (512, 16))


def lpips_cases(quick: bool = False) -> list[Case]:
    """The LPIPS head over VGG16's five taps at 256 px, B=16, bf16 and fp32, forward and backward."""
    from fastdae.kernels import lpips as L

    B = 16
    cases = []
    for dtype in ("bf16", "fp32"):
        for C, S in LPIPS_LAYERS[: 2 if quick else None]:
            dt = _dt(dtype)
            f0, f1, g0, g1 = (torch.empty(B, C, S, S, dtype=dt, device="meta") for _ in range(4))
            w = torch.empty(C, device="meta")
            part = torch.empty(B, 1024, device="meta")
            grad = torch.empty(B, device="meta")
            n = B * C * S * S
            shape = f"B{B} C{C} {S}x{S}"
            cases += [
                Case(
                    "lpips_fwd",
                    shape,
                    dtype,
                    L.fwd_launch(f0, f1, w, part),
                    8 * n,
                    2 * n * f0.element_size(),
                    lambda m: 1,
                    "ieee",
                ),
                Case(
                    "lpips_bwd",
                    shape,
                    dtype,
                    L.bwd_launch(grad, f0, f1, w, g0, g1, True, True),
                    20 * n,
                    4 * n * f0.element_size(),
                    lambda m: 1,
                    "ieee",
                ),
            ]
    return cases


def all_cases(quick: bool = False) -> list[Case]:
    return vq_cases(quick) + attention_cases(quick) + lpips_cases(quick)


def ci_cases() -> list[Case]:
    """One shape per shipped config family, for the CI test: VQ at D 8 / 32 / 256 (every D bucket
    the report's shapes reach) in bf16 and fp32; attention at D 64, 72 (in the fused-qkv layout the
    DiT passes) and 128, one per head-width family, in the dtypes impl="auto" runs the kernel for,
    every kernel and config; one LPIPS layer each way."""
    vq = [c for c in vq_cases(quick=True) if c.family == "vector_quantize"]
    attn = [
        c
        for c in attention_cases(quick=True)
        if c.shape.endswith(("D64 contiguous", "D72 fused-qkv", "D128 contiguous")) and c.shipped
    ]
    return vq + attn + lpips_cases(quick=True)[:2]


# ---------------------------------------------------------------------------------------------
# Compiling and reading one kernel
# ---------------------------------------------------------------------------------------------
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
    """Instruction list, loops (label .. backward branch) and the main loop's contents."""
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
        m = re.match(r"^BRA(?:\.\S+)?\s+`?\(?(\.?L\w+|LBB\w*)", text)
        if m and m.group(1) in labels and labels[m.group(1)] < j:  # (a branch to itself is a trap)
            loops.append((labels[m.group(1)], j + 1))

    def mma_count(span) -> int:
        return sum(1 for t in instrs[span[0] : span[1]] if t.startswith(("HGMMA", "HMMA")))

    main = max(loops, key=lambda s: (mma_count(s), s[1] - s[0])) if loops else (0, len(instrs))
    return dict(instrs=instrs, main=main, has_loop=bool(loops))


def _count_loads(instrs: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in instrs:
        kind = _load_kind(t.split()[0])
        if kind:
            out[kind] = out.get(kind, 0) + 1
    return out


def _dot_kind(mma: dict[str, int], instrs: list[str], has_dot: bool) -> str:
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
    """Hash of the code that reads a compiled kernel: changing it re-reads every cached kernel."""
    import inspect

    parts = (Static, _specialize, _ptxas_log, _load_kind, _read_sass, _count_loads, _dot_kind, compile_static)
    return hashlib.sha256("".join(inspect.getsource(p) for p in parts).encode()).hexdigest()[:16]


def compile_static(plan: KernelLaunch, cfg: LaunchConfig, target: Target) -> Static:
    """Compile one launch config for a target (no GPU needed) and read it; cached on disk."""
    import triton
    from triton.backends.compiler import GPUTarget

    src, key = _source(plan, cfg, target)
    cached = CACHE_DIR / f"{key}.json"
    if cached.exists():
        return Static(**json.loads(cached.read_text()))
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton 3.9's FP-fusion default notice
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", target.arch, 32),
            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        )
    text = log.getvalue()
    if "registers" not in text:  # a Triton cache hit prints no log
        text = _ptxas_log(kernel.asm["ptx"], target.arch)

    entry = text[text.find(f"entry function '{plan.name}'") :]  # the kernel's own properties

    def grab(pattern: str) -> int:
        m = re.search(pattern, entry)
        return int(m.group(1)) if m else 0

    sass = _read_sass(kernel.asm["sass"])
    instrs, (lo, hi) = sass["instrs"], sass["main"]
    mma: dict[str, int] = {}
    for t in instrs:
        op = t.split()[0]
        if op.startswith(("HGMMA", "HMMA")):
            mma[op] = mma.get(op, 0) + 1
    has_dot = "tt.dot" in kernel.asm["ttgir"] or "warp_group_dot" in kernel.asm["ttgir"]
    static = Static(
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
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(asdict(static)))
    return static


# ---------------------------------------------------------------------------------------------
# The rules every shipped config must meet (the CI test, tests/kernel_report/test_report.py)
# ---------------------------------------------------------------------------------------------
WIDE_LOADS = ("b128", "ldgsts_b128", "tma")


def violations(static: dict, dtype: str) -> list[str]:
    """What a compiled config (Static as a dict) breaks, in its main loop (the whole kernel when it
    has no loop):
    - any spill;
    - 8/16-bit global loads (operand elements loaded one by one);
    - operand tiles not loaded wide: no 128-bit LDG / cp.async.128 / TMA load, or, for fp32
      operands, more 32-bit scalar loads than wide ones. 32/64-bit loads next to 16-bit operands
      are the fp32 per-row / per-column vectors (lse, Delta, ||c||^2), which the MMA layouts
      replicate across threads; they are not operand tiles;
    - bf16/fp16 dots without tensor-core instructions."""
    out = []
    if static["spill_stores"] or static["spill_loads"]:
        out.append(f"spills {static['spill_stores']} B stored / {static['spill_loads']} B loaded")
    loads = static["loop_loads"]
    scalar16 = sum(n for k, n in loads.items() if k.endswith(("b16", "b8")))
    wide = sum(n for k, n in loads.items() if k in WIDE_LOADS)
    scalar32 = sum(n for k, n in loads.items() if k.endswith("b32"))
    if scalar16:
        out.append(f"{scalar16} 8/16-bit scalar global loads in the main loop")
    if loads and (wide == 0 or (dtype == "fp32" and scalar32 > wide)):
        out.append(f"main-loop tiles not loaded wide: {wide} 128-bit/cp.async/TMA vs {scalar32} 32-bit ({loads})")
    if dtype in ("bf16", "fp16") and static["dot"] not in ("-",) and not static["mma"]:
        out.append(f"{dtype} dots without tensor cores ({static['dot']})")
    return out


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def blocks_per_sm(static: Static, cfg: LaunchConfig, target: Target) -> int:
    """Resident programs per SM from registers (allocated per warp in units of 256), shared memory
    (+1 KB reserved per block) and threads."""
    threads = 32 * cfg.num_warps
    regs_per_warp = math.ceil(max(static.regs, 1) * 32 / 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // cfg.num_warps
    by_smem = target.smem_per_sm // (static.shared + 1024)
    return max(0, min(by_regs, by_smem, target.max_threads_per_sm // threads, target.max_blocks_per_sm))


@dataclass
class Estimate:
    blocks_per_sm: int
    programs: int
    waves: int
    tensor_us: float
    issue_us: float
    memory_us: float
    est_us: float | None
    roofline_us: float
    est_over_roofline: float | None


def estimate(case: Case, static: Static, cfg: LaunchConfig, target: Target, hbm_tbs: float) -> Estimate:
    meta = dict(cfg.meta)
    programs = math.prod(case.launch.grid(meta))
    bps = blocks_per_sm(static, cfg, target)
    peak = target.tflops[case.precision] * 1e12
    tensor = case.flops / peak
    memory = case.bytes / (hbm_tbs * 1e12)
    trips = case.trips(meta) if static.has_loop else 1
    per_program = (static.total_instrs - static.loop_instrs) + static.loop_instrs * trips
    issue = per_program * cfg.num_warps * programs / (target.sms * 4 * target.clock_ghz * 1e9)
    roofline = max(tensor, memory)
    if bps == 0:
        return Estimate(0, programs, 0, tensor * 1e6, issue * 1e6, memory * 1e6, None, roofline * 1e6, None)
    slots = target.sms * bps
    waves = math.ceil(programs / slots)
    quant = waves * slots / programs
    est = max(max(tensor, issue) * quant, memory)
    return Estimate(
        bps, programs, waves, tensor * 1e6, issue * 1e6, memory * 1e6, est * 1e6, roofline * 1e6, est / roofline
    )


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    family: str
    kernel: str
    shape: str
    dtype: str
    target: str
    config: str
    default: bool  # the first config (the interpreter's and the untuned launch)
    shipped: bool  # impl="auto" launches it on CUDA
    static: Static
    estimates: dict[str, Estimate] = field(default_factory=dict)  # per HBM bandwidth ("3.35TB/s")


def _config_str(cfg: LaunchConfig) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.meta) + f" w{cfg.num_warps} s{cfg.num_stages}"


def _compile_job(job: tuple[int, int, str]) -> Static:
    """Worker side of run(): rebuild the cases (launches hold lambdas, which do not pickle)."""
    case_i, cfg_i, target = job
    case = _WORKER_CASES[case_i]
    return compile_static(case.launch, case.launch.configs[cfg_i], TARGETS[target])


_WORKER_CASES: list[Case] = []


def run(
    cases: list[Case], targets: list[Target], jobs: int = 1, log: Callable[[str], None] = lambda s: None
) -> list[Row]:
    """Compile every config of every case for every target (in `jobs` forked processes) and model it."""
    if triton_interpret():
        raise RuntimeError("the kernel report compiles real kernels: unset TRITON_INTERPRET")
    # a kernel impl="auto" does not launch is compiled at its default config only (for the record)
    cases = [c if c.shipped else replace(c, launch=replace(c.launch, configs=c.launch.configs[:1])) for c in cases]
    todo = [(ci, fi, t.name) for t in targets for ci, c in enumerate(cases) for fi in range(len(c.launch.configs))]
    keys = {
        job: _source(cases[job[0]].launch, cases[job[0]].launch.configs[job[1]], TARGETS[job[2]])[1] for job in todo
    }
    unique = list({key: job for job, key in keys.items()}.values())  # N often does not change the kernel
    log(f"{len(todo)} kernel configs, {len(unique)} distinct compiles")
    _WORKER_CASES[:] = cases
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            done = dict(zip((keys[j] for j in unique), pool.map(_compile_job, unique, chunksize=1)))
    else:
        done = {keys[j]: _compile_job(j) for j in unique}
    statics = {job: done[key] for job, key in keys.items()}
    rows = []
    for target in targets:
        for ci, case in enumerate(cases):
            for i, cfg in enumerate(case.launch.configs):
                static = statics[(ci, i, target.name)]
                row = Row(
                    case.family,
                    case.launch.name,
                    case.shape,
                    case.dtype,
                    target.name,
                    _config_str(cfg),
                    i == 0,
                    case.shipped,
                    static,
                )
                for bw in target.hbm_tbs:
                    row.estimates[f"{bw}TB/s"] = estimate(case, static, cfg, target, bw)
                rows.append(row)
            log(f"{target.name} {case.family} {case.shape} {case.dtype}: {len(case.launch.configs)} config(s)")
    return rows


def _vector_share(loads: dict[str, int]) -> str:
    """128-bit / cp.async / TMA loads out of all global loads, as 'wide/total'."""
    wide = sum(n for k, n in loads.items() if k.endswith("b128") or k == "tma")
    return f"{wide}/{sum(loads.values())}"


def markdown(rows: list[Row], title: str) -> str:
    shipped = [r for r in rows if r.shipped]
    broken = [(r, v) for r in shipped if (v := violations(asdict(r.static), r.dtype))]
    lines = [
        f"# {title}",
        "",
        "**Estimated, not measured**: compiled on a CPU (no GPU) with Triton's bundled ptxas; figures",
        "from ptxas -v and the SASS; times from the simple model in `fastdae/kernel_report/`",
        "(GPU: not measured). Loads: main-loop global loads by kind (b128 = 128-bit LDG, ldgsts_* =",
        "cp.async, tma = TMA; b16/b32 = scalar); 'wide' = 128-bit + cp.async.128 + TMA out of all",
        "main-loop loads (the whole kernel when it has no loop).",
        "",
        f"Rules (tests/kernel_report/test_report.py): {len(shipped) - len(broken)} of the {len(shipped)} kernel x shape x config",
        'rows that impl="auto" launches pass. Rows marked `(not auto)` are reachable only with an explicit',
        'impl="triton" (fp32 attention: auto runs SDPA) and are listed for the record.',
    ]
    seen = set()
    for r, v in broken:
        key = (r.target, r.kernel, r.dtype, r.config, r.shape.split(" N")[0] + r.shape.split(" D")[-1][2:], tuple(v))
        if key not in seen:
            seen.add(key)
            lines.append(f"- {r.target} {r.family} {r.shape} {r.dtype} [{r.config}]: {'; '.join(v)}")
    lines += [
        "",
        "| target | kernel | shape | dtype | config | regs | spill B | smem KB | blk/SM | dot | main-loop loads | wide | loop instrs | est µs | roofline µs | est/roof |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.static
        e = next(iter(r.estimates.values()))
        loads = " ".join(f"{k}:{v}" for k, v in sorted(s.loop_loads.items())) or "-"
        est = f"{e.est_us:.0f}" if e.est_us is not None else "does not fit"
        ratio = f"{e.est_over_roofline:.2f}" if e.est_over_roofline is not None else "-"
        lines.append(
            f"| {r.target} | {r.family} | {r.shape} | {r.dtype}{'' if r.shipped else ' (not auto)'} "
            f"| {r.config}{' *' if r.default else ''} | {s.regs} "
            f"| {s.spill_stores} | {s.shared / 1024:.0f} | {e.blocks_per_sm} | {s.dot} | {loads} "
            f"| {_vector_share(s.loop_loads)} | {s.loop_instrs} | {est} | {e.roofline_us:.0f} | {ratio} |"
        )
    lines += [
        "",
        "`*` = the default config (first candidate); on CUDA the launcher autotunes over all listed.",
        "est/roofline at the first listed HBM bandwidth (H100 3.35 TB/s for sm90, A100 2.04 TB/s for sm80);",
        "the JSON has H200 (4.8 TB/s) too.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="sm90,sm80")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown")
    parser.add_argument("--quick", action="store_true", help="one N / K per shape family and two LPIPS layers")
    parser.add_argument("--ci", action="store_true", help="the CI test's set: one shape per config family")
    parser.add_argument(
        "--unshipped",
        action="store_true",
        help="also kernels impl='auto' does not launch (fp32 attention), at their default config",
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--families", default="", help="comma-separated prefixes (vq,attention,lpips); default all")
    args = parser.parse_args(argv)
    targets = [TARGETS[t] for t in args.targets.split(",")]
    cases = ci_cases() if args.ci else all_cases(args.quick)
    if not args.unshipped:  # fp32 attention's IEEE kernels take ptxas minutes each (they spill tens of KB)
        cases = [c for c in cases if c.shipped]
    if args.families:
        prefixes = tuple(p.strip() for p in args.families.split(","))
        cases = [
            c for c in cases if c.family.startswith(prefixes) or (c.family.startswith("vector") and "vq" in prefixes)
        ]
    rows = run(cases, targets, jobs=args.jobs, log=lambda s: print(s, file=sys.stderr))
    date = datetime.date.today().isoformat()
    stem = f"kernel-report-{'-'.join(t.name for t in targets)}-{date}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    meta = dict(
        date=date,
        triton=triton.__version__,
        torch=torch.__version__,
        measured=False,
        note="estimated, not measured: compiled without a GPU",
        targets=[asdict(t) for t in targets],
    )
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1) + "\n")
    (out / f"{stem}.md").write_text(
        markdown(rows, f"Static kernel report ({', '.join(t.name for t in targets)}, {date})")
    )
    print(out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
