"""How far `fastdae plan`'s time model is from a measured step: on this CPU, per stage of a preset, the
training step the plan counts (fastdae.plan.stage_models: the trainer's models and loss, forward +
backward; the cache: the encoder forward) timed at the preset's batch, against the plan's FLOPs for it.

    PYTHONPATH=$PWD python benchmarks/plan_check.py --preset default --out benchmarks/results/<name>

The plan predicts time = FLOPs / (peak x MFU). On a GPU the peak is the published dense bf16 figure;
here it is what this CPU measures for one large fp32 matmul (2048^3, one thread), the CPU's
dense-FMA ceiling. For each stage the check reports the measured step time (min and median of
--repeats runs after two warm-ups), the FLOPs the plan counted (meta device, attention included),
the FLOP/s achieved, the MFU that implies, and the ratio measured / predicted at the plan's default
MFU 0.4. The optimizer update is in neither the count nor the timed step. One intra-op thread; the
1-minute load average is recorded beside every figure (the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from fastdae.config import preset
from fastdae.plan import count, stage_models

STAGES = ("stage1", "cache", "stage2", "prior")
DEFAULT_MFU = 0.4


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn, repeats: int) -> dict[str, float]:
    """min / median seconds of fn() over `repeats` runs after two warm-ups, and the load around them."""
    load_before = os.getloadavg()[0]
    for _ in range(2):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return {
        "min_s": min(runs),
        "median_s": statistics.median(runs),
        "runs_s": runs,
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": os.getloadavg()[0],
    }


def sgemm_peak(repeats: int) -> dict[str, float]:
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timed(lambda: torch.mm(a, b), repeats)
    return {**t, "flops": 2 * n**3, "flops_per_s_best": 2 * n**3 / t["min_s"], "flops_per_s": 2 * n**3 / t["median_s"]}


def check(name: str, repeats: int) -> dict[str, Any]:
    cfg = preset(name)
    peak = sgemm_peak(repeats)
    stages = {}
    for stage in STAGES:
        stages[stage] = _stage(cfg, stage, peak, repeats)
    return {
        "preset": name,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "default_mfu": DEFAULT_MFU,
        "sgemm_peak": peak,
        "stages": stages,
    }


def _stage(cfg: Any, stage: str, peak: dict[str, float], repeats: int) -> dict[str, Any]:
    """One stage: the plan's FLOPs for a step at the preset's batch, and that step timed on the CPU."""
    batch = cfg.cache.batch_size if stage == "cache" else getattr(cfg, stage).batch_size
    gan = stage in ("stage1", "stage2") and getattr(cfg, stage).disc.weight > 0
    on_meta = stage_models(cfg, stage, "meta")
    flops = count(lambda b: on_meta.step(b, gan)).flops_per_image * batch
    torch.manual_seed(0)
    on_cpu = stage_models(cfg, stage, "cpu")
    with torch.no_grad() if stage == "cache" else contextlib.nullcontext():  # the cache stage runs under no_grad
        t = timed(lambda: on_cpu.step(batch, gan), repeats)
    achieved = flops / t["median_s"]
    predicted = flops / (peak["flops_per_s"] * DEFAULT_MFU)
    return {
        "batch": batch,
        "flops_per_step": flops,
        **t,
        "achieved_flops_per_s": achieved,
        "implied_mfu": achieved / peak["flops_per_s"],
        "predicted_s_at_default_mfu": predicted,
        "measured_over_predicted": t["median_s"] / predicted,
    }


def markdown(r: dict[str, Any]) -> str:
    peak = r["sgemm_peak"]
    lines = [
        f"# plan's time model vs a timed CPU step ({r['preset']} preset; {r['cpu']}, torch {r['torch']}, "
        f"{r['threads']} thread, {r['date']})",
        "",
        f"CPU ceiling: one 2048^3 fp32 matmul, {peak['flops_per_s'] / 1e9:.0f} GFLOP/s median "
        f"({peak['flops_per_s_best'] / 1e9:.0f} best; load {peak['load_avg_1min_before']:.1f} -> "
        f"{peak['load_avg_1min_after']:.1f}). The machine is shared with other jobs: every figure has its load beside "
        "it. Times: min / median of the runs, one step at the preset's batch, forward + backward (cache: forward). "
        "The step is the one the plan counts: LPIPS (random VGG16) is in it wherever lpips_weight > 0, also where "
        "the preset's own runs have no VGG16 weights and train without it. The ceiling and the steps ran in the "
        "same process, minutes apart, so the load hit both.",
        "",
        "| stage | batch | GFLOP/step (plan) | measured ms (min / median) | load 1-min | achieved GFLOP/s "
        "| implied MFU | predicted ms at MFU 0.4 | measured / predicted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, s in r["stages"].items():
        lines.append(
            f"| {stage} | {s['batch']} | {s['flops_per_step'] / 1e9:.2f} | {1e3 * s['min_s']:.1f} / "
            f"{1e3 * s['median_s']:.1f} | {s['load_avg_1min_before']:.1f} -> {s['load_avg_1min_after']:.1f} | "
            f"{s['achieved_flops_per_s'] / 1e9:.1f} | {s['implied_mfu']:.3f} | "
            f"{1e3 * s['predicted_s_at_default_mfu']:.1f} "
            f"| {s['measured_over_predicted']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", required=True, help="path prefix: <out>.json and <out>.md are written")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = check(args.preset, args.repeats)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
