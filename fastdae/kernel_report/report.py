"""Static kernel report: every Triton kernel compiled for sm_90 / sm_80 / sm_100 on a machine with no
GPU, at exactly the launch configs the launchers pick on that GPU, and read as a GPU engineer would.

    python -m fastdae.kernel_report [--targets sm90,sm80,sm100] [--out benchmarks/results] [--quick]

For each kernel x shape x config x target it records (from ptxas -v and the SASS of the cubin):
registers, spill bytes, shared memory, blocks per SM, tensor-core instructions (HGMMA = wgmma,
HMMA = mma.sync, UTCHMMA = tcgen05) and the precision they run at, global loads by width in the main
loop (128-bit / cp.async (LDGSTS) / TMA vs narrower), main-loop instructions per trip, the per-score
figures (wi/1k, instr/pair) and an **estimated** time from a simple model next to the roofline
(model.py). Nothing here is measured.

The package: targets.py (GPUs and peaks), cases.py (the launches), sass.py (compiling and reading a
kernel, the loop finder), model.py (rules, estimate), this file (running it all, markdown, CLI).

Compiling needs the real kernels, not the interpreter: run it without TRITON_INTERPRET (the CI
test starts it in a subprocess). Results are cached per compiled kernel (source hash, signature,
options, target) under ~/.cache/fastdae/kernel-report, so a rerun only compiles what changed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fastdae.kernel_report.cases import Case, all_cases, ci_cases
from fastdae.kernel_report.model import Estimate, estimate, per_score, violations
from fastdae.kernel_report.sass import Static, _source, compile_static
from fastdae.kernel_report.targets import TARGETS, Target
from fastdae.kernels._dispatch import triton_interpret
from fastdae.kernels._launch import LaunchConfig, for_arch


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
    per_score: float | None = None  # wi/1k (attention) or instr/pair (VQ)
    narrow_ok: int = 0  # fp32 vectors the main loop may load narrow (model.violations)
    estimates: dict[str, Estimate] = field(default_factory=dict)  # per HBM bandwidth ("3.35TB/s")


def _config_str(cfg: LaunchConfig) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.meta) + f" w{cfg.num_warps} s{cfg.num_stages}"


_WORKER_CASES: dict[str, list[Case]] = {}


def _compile_job(job: tuple[str, int, int]) -> Static:
    """Worker side of run() (forked: the cases hold lambdas, which do not pickle)."""
    target, case_i, cfg_i = job
    case = _WORKER_CASES[target][case_i]
    return compile_static(case.launch, case.launch.configs[cfg_i], TARGETS[target])


def build_cases(builder: Callable[[], list[Case]], target: Target, unshipped: bool) -> list[Case]:
    """The cases as the launchers build them on `target` (its config lists); a kernel impl="auto"
    does not launch is kept only with `unshipped`, at its default config (for the record)."""
    with for_arch(target.arch):
        cases = builder()
    if not unshipped:
        return [c for c in cases if c.shipped]
    return [c if c.shipped else replace(c, launch=replace(c.launch, configs=c.launch.configs[:1])) for c in cases]


def run(cases: dict[str, list[Case]], jobs: int = 1, log: Callable[[str], None] = lambda s: None) -> list[Row]:
    """Compile every config of every case of every target (name -> cases; in `jobs` forked
    processes) and model it."""
    if triton_interpret():
        raise RuntimeError("the kernel report compiles real kernels: unset TRITON_INTERPRET")
    todo = [(t, ci, fi) for t, cs in cases.items() for ci, c in enumerate(cs) for fi in range(len(c.launch.configs))]
    keys = {job: _source(cases[job[0]][job[1]].launch, _cfg(cases, job), TARGETS[job[0]])[1] for job in todo}
    unique = list({key: job for job, key in keys.items()}.values())  # N often does not change the kernel
    log(f"{len(todo)} kernel configs, {len(unique)} distinct compiles")
    _WORKER_CASES.clear()
    _WORKER_CASES.update(cases)
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            statics = pool.map(_compile_job, unique, chunksize=1)
    else:
        statics = [_compile_job(j) for j in unique]
    done = dict(zip((keys[j] for j in unique), statics, strict=True))
    rows = []
    for name, target_cases in cases.items():
        target = TARGETS[name]
        for ci, case in enumerate(target_cases):
            for i, cfg in enumerate(case.launch.configs):
                static = done[keys[(name, ci, i)]]
                row = Row(
                    case.family,
                    case.launch.name,
                    case.shape,
                    case.dtype,
                    name,
                    _config_str(cfg),
                    i == 0,
                    case.shipped,
                    static,
                    per_score(case, static, cfg),
                    case.narrow_ok,
                )
                for bw in target.hbm_tbs:
                    row.estimates[f"{bw}TB/s"] = estimate(case, static, cfg, target, bw)
                rows.append(row)
            log(f"{name} {case.family} {case.shape} {case.dtype}: {len(case.launch.configs)} config(s)")
    return rows


def _cfg(cases: dict[str, list[Case]], job: tuple[str, int, int]) -> LaunchConfig:
    return cases[job[0]][job[1]].launch.configs[job[2]]


def _vector_share(loads: dict[str, int]) -> str:
    """128-bit / cp.async / TMA loads out of all global loads, as 'wide/total'."""
    wide = sum(n for k, n in loads.items() if k.endswith("b128") or k == "tma")
    return f"{wide}/{sum(loads.values())}"


def _per_score_str(r: Row) -> str:
    if r.per_score is None:
        return "-"
    return f"{r.per_score:.0f}" if r.family.startswith("attention") else f"{r.per_score:.2f}"


def markdown(rows: list[Row], title: str, preamble: str = "") -> str:
    shipped = [r for r in rows if r.shipped]
    broken = [(r, v) for r in shipped if (v := violations(asdict(r.static), r.dtype, r.narrow_ok))]
    lines = [
        f"# {title}",
        "",
        "**Estimated, not measured**: compiled on a CPU (no GPU) with Triton's bundled ptxas; figures",
        "from ptxas -v and the SASS; times from the simple model in `fastdae/kernel_report/model.py`",
        "(GPU: not measured). Loads: main-loop global loads by kind (b128 = 128-bit LDG, ldgsts_* =",
        "cp.async, tma = TMA; b16/b32 = scalar); 'wide' = 128-bit + cp.async.128 + TMA out of all",
        "main-loop loads (the whole kernel when it has no loop). per score: attention wi/1k = warp",
        "instructions per 1,024 scores (main-loop instructions x warps / (BLOCK_M x BLOCK_N / 1024));",
        "VQ instr/pair = thread instructions per (row, code) pair.",
        "",
        f"Rules (tests/kernel_report/test_report.py): {len(shipped) - len(broken)} of the {len(shipped)} "
        'kernel x shape x config rows that impl="auto" launches pass.',
    ]
    seen = set()
    for r, v in broken:
        key = (r.target, r.kernel, r.dtype, r.config, r.shape.split(" N")[0] + r.shape.split(" D")[-1][2:], tuple(v))
        if key not in seen:
            seen.add(key)
            lines.append(f"- {r.target} {r.family} {r.shape} {r.dtype} [{r.config}]: {'; '.join(v)}")
    if preamble:
        lines += ["", preamble.rstrip()]
    lines += [
        "",
        "| target | kernel | shape | dtype | config | regs | spill B | smem KB | blk/SM | dot | main-loop loads "
        "| wide | loop instrs | per score | tensor µs | issue µs | est µs | roofline µs | est/roof |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"| {_vector_share(s.loop_loads)} | {s.loop_instrs} | {_per_score_str(r)} | {e.tensor_us:.0f} "
            f"| {e.issue_us:.0f} | {est} | {e.roofline_us:.0f} | {ratio} |"
        )
    lines += [
        "",
        "`*` = the default config (first candidate); on CUDA the launcher autotunes over all listed.",
        "est/roofline at the first listed HBM bandwidth (H100 3.35 TB/s for sm90, A100 2.04 TB/s for sm80,",
        "B200 8 TB/s for sm100); the JSON has H200 (4.8 TB/s) too.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="sm90,sm80,sm100")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown")
    parser.add_argument("--quick", action="store_true", help="one N / K per shape family and two LPIPS layers")
    parser.add_argument("--ci", action="store_true", help="the CI test's set: one shape per config family")
    parser.add_argument(
        "--unshipped", action="store_true", help="also kernels impl='auto' does not launch, at their default config"
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--families", default="", help="comma-separated prefixes (vq,attention,lpips); default all")
    parser.add_argument("--stem", default="", help="file name stem (default kernel-report-<targets>-<date>)")
    args = parser.parse_args(argv)
    targets = [TARGETS[t] for t in args.targets.split(",")]
    prefixes = tuple(p.strip() for p in args.families.split(",") if p.strip())

    def builder() -> list[Case]:
        cases = ci_cases() if args.ci else all_cases(args.quick)
        if prefixes:
            cases = [
                c
                for c in cases
                if c.family.startswith(prefixes) or (c.family == "vector_quantize" and "vq" in prefixes)
            ]
        return cases

    cases = {t.name: build_cases(builder, t, args.unshipped) for t in targets}
    rows = run(cases, jobs=args.jobs, log=lambda s: print(s, file=sys.stderr))
    date = datetime.date.today().isoformat()
    stem = args.stem or f"kernel-report-{'-'.join(t.name for t in targets)}-{date}"
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
