"""The rules every shipped config must meet (the CI test, tests/kernel_report/test_report.py) and the
model that turns a compiled kernel into an estimated time and per-score instruction figures.

The model (per kernel launch, on the target's peak figures in targets.py):
    tensor  = MMA flops (the algorithm's, plus work a kernel adds on the tensor cores) / tensor-core
              (or FMA) peak at the dot's precision
    issue   = warp instructions / (SMs x 4 schedulers x clock); a program issues its non-loop
              SASS once and its main loop once per trip
    memory  = compulsory bytes (each operand read once, outputs written once) / HBM bandwidth
    est     = max(tensor, issue) x wave quantisation, and at least memory
    roofline = max(flops / peak, bytes / bandwidth)
It ignores latency, L2 traffic, bank conflicts and overlap limits: a lower bound of sorts, good for
comparing configs and spotting 10x problems, not for promising a speed.

Per-score figures (what the issue time is made of, independent of the problem size):
    wi/1k      attention: warp instructions issued per 1,024 scores = main-loop instructions x warps
               / (BLOCK_M x BLOCK_N / 1,024)
    instr/pair VQ: thread instructions per (row, code) pair = main-loop instructions x 32 x warps
               / (BLOCK_N x BLOCK_K)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastdae.kernel_report.cases import Case
from fastdae.kernel_report.sass import Static
from fastdae.kernel_report.targets import Target
from fastdae.kernels._launch import LaunchConfig

WIDE_LOADS = ("b128", "ldgsts_b128", "tma")


def violations(static: dict, dtype: str, narrow_ok: int = 0) -> list[str]:
    """What a compiled config (Static as a dict) breaks, in its main loop (the whole kernel when it
    has no loop):
    - any spill;
    - 8/16-bit global loads (operand elements loaded one by one);
    - operand tiles not loaded wide: no 128-bit LDG / cp.async.128 / TMA load, or, for fp32
      operands, more 32-bit scalar loads than wide ones;
    - in a tensor-core loop over 16-bit operands, more 32-bit loads than `narrow_ok`, the number of
      fp32 per-row vectors the loop reads (dK/dV: lse and Delta, one load each): an operand chunk
      (D = 72's columns 64-79) must load at least 64 bits at a time;
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
    narrow = sum(n for k, n in loads.items() if k.endswith("b32"))
    if dtype in ("bf16", "fp16") and static["mma"] and narrow > narrow_ok:
        out.append(f"{narrow} 32-bit loads in the main loop where only {narrow_ok} fp32 vector(s) may be ({loads})")
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


def per_score(case: Case, static: Static, cfg: LaunchConfig) -> float | None:
    """wi/1k (attention) or instr/pair (VQ), see the module docstring; None for kernels without."""
    covered = case.per_trip(dict(cfg.meta)) if case.per_trip and static.has_loop else 0
    if not covered:
        return None
    if case.family.startswith("attention"):
        return static.loop_instrs * cfg.num_warps / (covered / 1024)
    return static.loop_instrs * 32 * cfg.num_warps / covered


def estimate(case: Case, static: Static, cfg: LaunchConfig, target: Target, hbm_tbs: float) -> Estimate:
    meta = dict(cfg.meta)
    programs = math.prod(case.launch.grid(meta))
    bps = blocks_per_sm(static, cfg, target)
    peak = target.tflops[case.precision] * 1e12
    tensor = (case.flops + case.extra_mma_flops) / peak
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
