"""The markdown report of benchmarks/bench_e2e.py's pytest-benchmark JSON, for whichever of its groups
the file holds (e2e-recipe, e2e-precision, e2e-precision-step-*).

    python benchmarks/e2e_report.py <pytest-benchmark json> > benchmarks/results/<device>-e2e-<date>.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench_e2e import PRECISIONS, STAGES, STEP_STAGES, VARIANTS  # benchmarks/ is on sys.path


def recipe_report(data: dict[str, Any]) -> list[str]:
    """Markdown lines of e2e-recipe: per-member medians over rounds, the per-round and median wall-clock
    ratios, the split."""
    runs = [b["extra_info"] for b in data["benchmarks"] if b["name"].startswith("test_e2e_recipe")]
    by = {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["round"]) for v in VARIANTS}
    ratios = [c["total_s"] / f["total_s"] for f, c in zip(by["fastdae"], by["common-way"], strict=True)]
    med = {
        v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if all(isinstance(r.get(k), float) for r in rs)}
        for v, rs in by.items()
    }  # (the round's ratio is on its second member only)
    first = runs[0]
    loads = [r[k] for r in runs for k in ("load_avg_1min_before", "load_avg_1min_after")]
    title = (
        f"# End-to-end recipe: fastdae vs the common way ({first['device']}, torch {first['torch']}, "
        f"intra-op threads: {first['threads']})"
    )
    sizes = (
        f"Recipe: {first['image_size']} px shapes, {first['num_samples']} images; stage 1 {first['stage1_steps']} "
        f"steps x {first['stage1_batch']}, cache, stage 2 {first['stage2_steps']} x {first['stage2_batch']}, prior "
        f"({first['dit']}) {first['prior_steps']} x {first['prior_batch']}; {len(ratios)} interleaved rounds."
    )
    load = (
        f"1-minute load average during the runs: {min(loads):.1f} to {max(loads):.1f} "
        f"(machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')})."
    )
    headline = (
        f"**Wall-clock ratio common-way / fastdae: {statistics.median(ratios):.2f}x** (median over rounds; "
        f"per round: {', '.join(f'{x:.2f}x' for x in ratios)})."
    )
    lines = [
        title,
        "",
        sizes,
        load,
        "",
        headline,
        "",
        "| stage | fastdae (s) | common way (s) | ratio | fastdae ms/step | common ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for s in (*STAGES, "other", "total"):
        f, c = med["fastdae"][f"{s}_s"], med["common-way"][f"{s}_s"]
        ms = [m.get(f"{s}_loop_ms_per_step") for m in (med["fastdae"], med["common-way"])]
        ms_text = " | ".join(f"{x:.0f}" if x is not None else "" for x in ms)
        ratio = f"{c / f:.2f}x" if c > 0 else "(no cache)"
        lines.append(f"| {s} | {f:.2f} | {c:.2f} | {ratio} | {ms_text} |")
    notes = (
        "Per-member medians over rounds (so the total row's ratio, of medians, can differ from the "
        "headline, the median of per-round ratios); `other` is fastdae.train's setup outside the stages "
        "(config, logging, summary) or the common way's run outside its stages. ms/step: the training "
        "loop alone (no model build, eval or final save), per step."
    )
    lines += ["", notes, "", "| final | fastdae | common way |", "|---|---|---|"]
    for k in ("final_stage1_psnr", "final_stage2_psnr", "final_stage1", "final_stage2", "final_prior"):
        lines.append(f"| {k.removeprefix('final_')} | {med['fastdae'][k]:.3f} | {med['common-way'][k]:.3f} |")
    components = [b for b in data["benchmarks"] if b["name"].startswith("test_e2e_component")]
    lines += ["", "Components at the recipe's shapes (median of rounds, same run):", ""]
    lines += [
        f"- {b['extra_info']['component']} (batch {b['extra_info']['batch']}): {1e3 * b['stats']['median']:.0f} ms"
        for b in components
    ]
    return lines


def precision_report(data: dict[str, Any]) -> list[str]:
    """Markdown lines of e2e-precision: seconds per stage and reconstruction PSNR, fp32 vs bf16, per
    round (same seed in every round) and the median bf16 / fp32 time ratio."""
    runs = [b["extra_info"] for b in data["benchmarks"] if b["name"].startswith("test_e2e_precision[")]
    by = {p: sorted((r for r in runs if r["precision"] == p), key=lambda r: r["round"]) for p in PRECISIONS}
    first = runs[0]
    loads = [r[k] for r in runs for k in ("load_avg_1min_before", "load_avg_1min_after")]
    ratios = [b["total_s"] / f["total_s"] for f, b in zip(by["fp32"], by["bf16"], strict=True)]
    ae = ("stage1", "cache", "stage2")  # the stages bf16 autocasts on the CPU
    ae_ratios = [
        sum(b[f"{s}_s"] for s in ae) / sum(f[f"{s}_s"] for s in ae) for f, b in zip(by["fp32"], by["bf16"], strict=True)
    ]
    psnr = {
        s: [b[f"{s}_psnr"] - f[f"{s}_psnr"] for f, b in zip(by["fp32"], by["bf16"], strict=True)]
        for s in ("stage1", "stage2")
    }
    cpu = data["machine_info"].get("cpu", {}).get("brand_raw", first["cpu"])
    lines = [
        f"# CPU bf16 autocast on the whole recipe (default preset, {first['image_size']} px; {cpu}, "
        f"torch {first['torch']}, intra-op threads: {first['threads']})",
        "",
        f"Stage 1 {first['stage1_steps']} steps, cache, stage 2 {first['stage2_steps']}, prior {first['prior_steps']}; "
        f"{len(ratios)} interleaved round(s), same seed. precision bf16 = bf16 autocast in stage 1, the cache and "
        "stage 2; the prior stays fp32 (fastdae.precision). 1-minute load average during the runs: "
        f"{min(loads):.1f} to {max(loads):.1f} (machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}).",
        "",
        f"**Wall-clock ratio bf16 / fp32: {statistics.median(ratios):.2f}x** (median over rounds; per round: "
        f"{', '.join(f'{x:.2f}x' for x in ratios)}). Stage 1 + cache + stage 2 alone (the stages bf16 autocasts): "
        f"{statistics.median(ae_ratios):.2f}x (per round: {', '.join(f'{x:.2f}x' for x in ae_ratios)}).",
        "",
        "Reconstruction PSNR, bf16 minus fp32 (dB, per round): stage 1 "
        f"{', '.join(f'{x:+.2f}' for x in psnr['stage1'])}; stage 2 {', '.join(f'{x:+.2f}' for x in psnr['stage2'])}.",
        "",
        "| round | precision | total (s) | stage1 (s) | cache (s) | stage2 (s) | prior (s) | stage1 ms/step "
        "| stage2 ms/step | prior ms/step | stage1 PSNR (dB) | stage2 PSNR (dB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["round"], r["precision"])):
        secs = " | ".join(f"{r[f'{s}_s']:.1f}" for s in STAGES)
        ms = " | ".join(f"{r[f'{s}_loop_ms_per_step']:.0f}" for s in ("stage1", "stage2", "prior"))
        lines.append(
            f"| {r['round']} | {r['precision']} | {r['total_s']:.1f} | {secs} | {ms} | {r['stage1_psnr']:.2f} "
            f"| {r['stage2_psnr']:.2f} |"
        )
    return lines


def precision_step_report(data: dict[str, Any]) -> list[str]:
    """Markdown lines of e2e-precision-step-*: min / median ms per step, fp32 vs bf16, and the ratio."""
    runs = [b for b in data["benchmarks"] if b["name"].startswith("test_e2e_precision_step")]
    by = {(b["extra_info"]["stage"], b["extra_info"]["precision"]): b for b in runs}
    loads = [b["extra_info"][k] for b in runs for k in ("load_avg_1min_before", "load_avg_1min_after")]
    lines = [
        "## One training step per stage, fp32 vs bf16 autocast (default preset, LPIPS on with a random VGG16)",
        "",
        f"{runs[0]['stats']['rounds']} rounds per member; 1-minute load average {min(loads):.1f} to {max(loads):.1f}.",
        "",
        "| stage | batch | autocast under bf16 | fp32 ms (min / median) | bf16 ms (min / median) "
        "| bf16 / fp32 (min) | bf16 / fp32 (median) | bf16 everywhere / fp32 (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in STEP_STAGES:
        f, b, e = (by.get((stage, p)) for p in ("fp32", "bf16", "bf16-everywhere"))
        if f is None or b is None:
            continue
        fs, bs = f["stats"], b["stats"]
        forced = f"{e['stats']['median'] / fs['median']:.2f}x" if e is not None else "not measured"
        lines.append(
            f"| {stage} | {b['extra_info']['batch']} | {b['extra_info']['autocast']} | {1e3 * fs['min']:.0f} / "
            f"{1e3 * fs['median']:.0f} | {1e3 * bs['min']:.0f} / {1e3 * bs['median']:.0f} | "
            f"{bs['min'] / fs['min']:.2f}x | {bs['median'] / fs['median']:.2f}x | {forced} |"
        )
    return lines


def report(path: Path) -> str:
    """Markdown of whichever groups the pytest-benchmark JSON at `path` holds."""
    data = json.loads(path.read_text())
    names = [b["name"] for b in data["benchmarks"]]
    parts = []
    if any(n.startswith("test_e2e_recipe") for n in names):
        parts.append(recipe_report(data))
    if any(n.startswith("test_e2e_precision[") for n in names):
        parts.append(precision_report(data))
    if any(n.startswith("test_e2e_precision_step") for n in names):
        parts.append(precision_step_report(data))
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(report(Path(sys.argv[1])))
