"""A study's report: mean ± std and the 95% Student-t interval over seeds per metric per variant
(`summarize`), Welch's t-test between the arms with one sentence each (`pairwise_tests`,
`significance_sentence`), the capacity curves, report.md / report.json, metrics.png (bars with ±std,
drawn with matplotlib when installed: pip install 'fastdae[plots]') and samples.png (each variant's
seed-0 sample grid side by side)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastdae import files
from fastdae import measure as M
from fastdae.measure.stats import ALPHA, LEVEL, mean_ci, welch

# key, label in the report, +1 when higher is better (-1 lower)
METRICS: tuple[tuple[str, str, int], ...] = (
    ("psnr", "PSNR (dB)", 1),
    ("ssim", "SSIM", 1),
    ("lpips", "LPIPS", -1),
    ("rfd_feat", "rFD-feat", -1),
    ("rfid", "rFID", -1),
    ("fd_feat", "FD-feat (samples)", -1),
    ("fid", "FID (samples)", -1),
    ("validity", "validity", 1),
    ("class_accuracy", "class accuracy", 1),
    ("prior_loss", "DiT final loss", -1),
    ("lipschitz", "Lipschitz lower bound", -1),
    ("jac_spectral", "Jacobian spectral norm", -1),
    ("jac_frobenius", "Jacobian Frobenius (Hutchinson)", -1),
    ("min_width", "minimal decoder width", -1),
    ("penalised_distance", "penalised distance D", -1),
)


# the arm pairs a comparison tests, (a, b): is a better than b? control isolates the weak decoder's
# effect (dae vs control) from the fresh stage-2 decoder's (control vs joint)
PAIRS: tuple[tuple[str, str], ...] = (("dae", "joint"), ("dae", "control"), ("control", "joint"))
ARM_NAMES = {"dae": "DAE"}  # how the sentences name a variant (others: as is)
# the decoder-complexity probes, for each of which the paper predicts DAE's decoder is the simplest (lowest)
PROBES = ("lipschitz", "jac_spectral", "jac_frobenius", "penalised_distance")
LEARNED = 0.8  # sample class accuracy from which a prior counts as having learned the classes (the study's bar)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> metric -> {mean, std, n, ci95} (stats.mean_ci: ci95 is None for one seed); None
    values (e.g. no width reached the capacity target) are left out and n says how many counted
    ({"n": 0}: None in every run, shown as "none" in the table)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant, results in runs.items():
        out[variant] = {}
        for key, _, _ in METRICS:
            values = [r[key] for r in results if r.get(key) is not None]
            if values:
                out[variant][key] = mean_ci(values)
            elif any(key in r for r in results):  # measured, but None in every run
                out[variant][key] = {"n": 0}
    return out


def capacity_curves(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> decoder width -> PSNR (dB) {mean, std, n} of the fresh decoders the minimal-capacity
    probe fitted to each run's frozen latents: the whole curve, of which min_width reads one point."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant, results in runs.items():
        psnrs: dict[int, list[float]] = {}
        for r in results:
            for point in r.get("capacity_curve", []):
                psnrs.setdefault(point["width"], []).append(10 * math.log10(M.DATA_RANGE**2 / point["error"]))
        out[variant] = {str(w): mean_ci(v) for w, v in sorted(psnrs.items())}
    return out


def pairwise_tests(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Welch's t-test over seeds for each of PAIRS whose both arms ran, for each metric measured in
    both: stats.welch's {diff (mean a - mean b), ci95, t, dof, p, n_a, n_b} plus a, b, metric and
    `better`: the arm whose mean is better in the metric's direction when p < ALPHA, else None."""
    tests = []
    for a, b in PAIRS:
        if a not in runs or b not in runs:
            continue
        for key, _, direction in METRICS:
            va = [r[key] for r in runs[a] if r.get(key) is not None]
            vb = [r[key] for r in runs[b] if r.get(key) is not None]
            if not va or not vb:
                continue
            w = welch(va, vb)
            better = None
            if w["p"] is not None and w["p"] < ALPHA:
                better = a if direction * w["diff"] > 0 else b
            tests.append({"a": a, "b": b, "metric": key, **w, "better": better})
    return tests


def significance_sentence(test: dict[str, Any]) -> str:
    """One plain sentence for a pairwise test (`pairwise_tests`): who beats whom on the metric and by
    how much (the winner's improvement in the metric's better direction, with its 95% interval), or
    that there is no significant difference; with t, the Welch dof, p and the seeds counted."""
    label, direction = next((label, d) for k, label, d in METRICS if k == test["metric"])
    a, b = (ARM_NAMES.get(v, v) for v in (test["a"], test["b"]))
    seeds = f"n = {test['n_a']} vs {test['n_b']} seeds"
    if test["p"] is None:
        return (
            f"{a} vs {b} on {label}: {a} - {b} = {_fmt(test['diff'])}, not testable ({seeds}; Welch's test "
            f"needs >= 2 seeds per arm and some spread)."
        )
    stat = f"t = {test['t']:.3g}, dof = {test['dof']:.3g}, p = {test['p']:.2g}, {seeds}"
    if test["better"] is None:
        lo, hi = test["ci95"]
        return (
            f"No significant difference between {a} and {b} on {label} (p >= {ALPHA:g}): {a} - {b} = "
            f"{_fmt(test['diff'])} (95% CI {_fmt(lo)} to {_fmt(hi)}), {stat}."
        )
    a_wins = test["better"] == test["a"]
    winner, loser = (a, b) if a_wins else (b, a)
    sign = direction if a_wins else -direction  # the winner's improvement = sign * (mean a - mean b) > 0
    lo, hi = sorted(sign * c for c in test["ci95"])
    by = _fmt(sign * test["diff"])
    return f"{winner} beats {loser} on {label} by {by} (95% CI {_fmt(lo)} to {_fmt(hi)}), {stat}."


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _significance_lines(tests: list[dict[str, Any]]) -> list[str]:
    """The report's significance section: per arm pair, a tally and one sentence per metric."""
    if not tests:
        return []
    lines = [
        "",
        f"## Significance: Welch's t-test over seeds (two-sided, α = {ALPHA:g})",
        "",
        "Each sentence compares the arms' means over seeds; \"beats\" follows the metric's direction "
        "(↑ / ↓ above) and needs p < α; the interval is that of the difference of means (Welch–"
        "Satterthwaite dof). The test is unpaired: it makes no use of the arms sharing seed numbers.",
    ]
    for a, b in dict.fromkeys((t["a"], t["b"]) for t in tests):
        pair = [t for t in tests if (t["a"], t["b"]) == (a, b)]
        wins_a, wins_b = (sum(t["better"] == v for t in pair) for v in (a, b))
        na, nb = (ARM_NAMES.get(v, v) for v in (a, b))
        lines += [
            "",
            f"### {na} vs {nb}",
            "",
            f"{na} is significantly better on {wins_a}, {nb} on {wins_b}, of {len(pair)} metrics.",
            "",
        ]
        lines += [f"- {significance_sentence(t)}" for t in pair]
    return lines


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """The report's verdict, in words, for a study with a dae arm: whom DAE significantly beats and
    loses to, per arm pair; which way the decoder-complexity probes point; whether the priors learned
    the classes (class accuracy of samples against chance and LEARNED)."""
    summary, tests = report["summary"], report.get("tests", [])
    if "dae" not in summary or not tests:
        return []
    labels = {k: label for k, label, _ in METRICS}
    lines = ["", f"## Verdict (Welch's t-test over seeds, α = {ALPHA:g})", ""]
    for other in (v for v in ("joint", "control") if v in summary):
        pair = [t for t in tests if (t["a"], t["b"]) == ("dae", other)]
        wins, losses = ([labels[t["metric"]] for t in pair if t["better"] == v] for v in ("dae", other))
        probes = [k for k in PROBES if summary["dae"].get(k, {}).get("n") and summary[other].get(k, {}).get("n")]
        lower = [labels[k] for k in probes if summary["dae"][k]["mean"] < summary[other][k]["mean"]]
        lines += [
            f"- **DAE vs {other}**: DAE is significantly better on {', '.join(wins) or 'no metric'}; {other} "
            f"on {', '.join(losses) or 'no metric'}; no significant difference on the other "
            f"{len(pair) - len(wins) - len(losses)} of {len(pair)} metrics. Complexity probes (the paper "
            f"predicts DAE's decoder is the simpler): DAE's mean is lower on {len(lower)} of {len(probes)}"
            f"{' (' + ', '.join(lower) + ')' if lower else ''}."
        ]
    accuracy = {v: s["class_accuracy"]["mean"] for v, s in summary.items() if s.get("class_accuracy", {}).get("n")}
    if accuracy:
        k = report["reference"].get("num_classes")
        chance = f"chance {1 / k:.2f}, " if k else ""
        real = report["reference"].get("class_accuracy_real")
        learned = [v for v, a in accuracy.items() if a >= LEARNED]
        lines += [
            "- **Did the priors learn the classes?** Class accuracy of samples: "
            + ", ".join(f"{v} {a:.2f}" for v, a in accuracy.items())
            + f" ({chance}real images {_fmt(real) if real is not None else 'n/a'}); "
            + (
                f"at or above {LEARNED:g}: {', '.join(learned)}."
                if learned
                else f"no arm reaches {LEARNED:g}: the generation metrics compare priors that learned the classes "
                f"only partly."
            )
        ]
    return lines


def markdown(report: dict[str, Any]) -> str:
    variants = list(report["summary"])
    lines = [f"# {report['title']}", ""]
    if report.get("command"):
        lines += ["Command:", "", f"    {report['command']}", ""]
    lines += [
        f"{report['seeds']} seed(s) per variant, mean ± std [{LEVEL:.0%} confidence interval of the mean, "
        f"Student t with n - 1 dof] (sample std over seeds; n = seeds counted when fewer). "
        f"Device {report['device']}, torch {report['torch']}."
    ]
    lines += verdict_lines(report)
    lines += ["", "| metric | better | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for key, label, direction in METRICS:
        cells = []
        for v in variants:
            s = report["summary"][v].get(key)
            n = f" (n={s['n']})" if s and s["n"] < report["seeds"] else ""
            ci = f" [{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}]" if s and s.get("ci95") else ""
            cells.append("—" if not s else "none" if s["n"] == 0 else f"{_fmt(s['mean'])} ± {_fmt(s['std'])}{ci}{n}")
        if any(c != "—" for c in cells):
            lines.append(f"| {label} | {'↑' if direction > 0 else '↓'} | " + " | ".join(cells) + " |")
    lines += _significance_lines(report.get("tests", []))
    capacity = report.get("capacity", {})
    widths = sorted({int(w) for c in capacity.values() for w in c})
    if widths:
        ev = report["eval"]
        lines += [
            "",
            f"Minimal-capacity probe: PSNR (dB) of a fresh decoder of each width fitted to the frozen "
            f"latents ({ev['capacity_images']} training images, {ev['capacity_steps']} Adam steps); "
            f'"minimal decoder width" above is the first width reaching {ev["capacity_target_psnr"]:g} dB.',
            "",
            "| width | " + " | ".join(variants) + " |",
            "|---|" + "---|" * len(variants),
        ]
        for w in widths:
            cells = [
                f"{_fmt(c['mean'])} ± {_fmt(c['std'])}" if (c := capacity.get(v, {}).get(str(w))) else "—"
                for v in variants
            ]
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
    if "split" in report:
        sp = report["split"]
        lines += [
            "",
            f"Data: {sp['train_items']} training items, {sp['heldout_items']} held out (never trained on; "
            f"data.holdout). The judge uses held-out items only: {sp['eval_images']} evaluation images "
            f"(reconstructions, real feature statistics, the classifier's accuracy), {sp['floor_images']} "
            f"for the real-data floor, and {sp['classifier_images']} the classifier trains on.",
        ]
    ref = report["reference"]
    lines += [
        "",
        "Reference (real held-out images): "
        + ", ".join(f"{k} = {_fmt(v) if isinstance(v, float) else v}" for k, v in ref.items()),
    ]
    if "best" in report:
        b = report["best"]
        lines += ["", f"Best by {b['select']}: **{b['variant']}** ({_fmt(b['mean'])})."]
    lines += [
        "",
        "Metric definitions: fastdae/measure/judge.py (EvalConfig) and fastdae/measure/. FD-feat is a "
        "Fréchet distance in the features of a classifier trained on the dataset, not FID. "
        '"none": no run had a value (minimal width: no width reached the target error).',
        "",
        "![metrics](metrics.png)"
        if report.get("metrics_png") == "drawn"
        else f"metrics.png: {report.get('metrics_png')}",
        "",
        "![samples](samples.png)",
        "",
    ]
    return "\n".join(lines)


def _draw_metric_bars(report: dict[str, Any], path: Path) -> str:
    """One panel per metric: a bar per variant (mean) with ±std error bars, with matplotlib (the
    `plots` extra). Returns what happened, for the report: without matplotlib nothing is drawn."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state is touched
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install 'fastdae[plots]')"
    variants = list(report["summary"])
    keys = [(k, label) for k, label, _ in METRICS if any(report["summary"][v].get(k, {}).get("n") for v in variants)]
    cols = 4
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, label) in zip(axes, keys, strict=False):
        stats = [report["summary"][v].get(key) or {"n": 0} for v in variants]
        means = [s["mean"] if s["n"] else float("nan") for s in stats]
        stds = [s["std"] if s["n"] else 0.0 for s in stats]
        ax.bar(range(len(variants)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(variants))])
        ax.set_xticks(range(len(variants)), [v[:14] for v in variants], rotation=20, fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return "drawn"


def _draw_sample_grids(report: dict[str, Any], path: Path) -> None:
    """Each variant's seed-0 sample grid (report["sample_grids"]), side by side, labelled."""
    from PIL import Image, ImageDraw

    grids = {v: Path(p) for v, p in report.get("sample_grids", {}).items()}
    images = {v: Image.open(p).convert("RGB") for v, p in grids.items() if p.is_file()}
    if not images:
        return
    scale = max(1, 256 // max(im.width for im in images.values()))  # small grids are upscaled, pixel-exact
    images = {v: im.resize((im.width * scale, im.height * scale), Image.NEAREST) for v, im in images.items()}
    w, h = sum(im.width + 10 for im in images.values()) + 10, max(im.height for im in images.values()) + 30
    canvas = Image.new("RGB", (w, h), "white")
    draw, x = ImageDraw.Draw(canvas), 10
    for v, im in images.items():
        draw.text((x, 6), v, fill="black")
        canvas.paste(im, (x, 24))
        x += im.width + 10
    canvas.save(path)


def write_report(report: dict[str, Any], out_dir: str | Path) -> None:
    """out_dir/report.md, report.json, metrics.png, samples.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["metrics_png"] = _draw_metric_bars(report, out_dir / "metrics.png")
    _draw_sample_grids(report, out_dir / "samples.png")
    files.write_bytes(out_dir / "report.json", json.dumps(report, indent=1).encode())  # keeps the variants' order
    files.write_bytes(out_dir / "report.md", markdown(report).encode())
