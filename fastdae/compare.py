"""The three-arm comparison of PAPER.md §5 and the ablation of the weakening knob.

    report = compare("x.yaml", arms=("joint", "dae", "control"), seeds=3, out_dir="results/compare")
    report = ablation("x.yaml", knob="width_mult", values=[0.25, 0.5, 1.0], seeds=2, out_dir="results/ablation")

Each (variant, seed) is one `fastdae.train` run (mode = the arm, seed = s) in out_dir/runs/<variant>-s<seed>;
the arms share every budget of the config, so they use equal compute: joint trains the full decoder
for stage1.steps + stage2.steps, dae and control train stage 1 for stage1.steps (weak / full decoder)
and a fresh full decoder for stage2.steps, and every arm trains the same DiT for prior.steps.
Then each run is evaluated (`evaluate_run`) against one `Judge` shared by all runs, and out_dir gets
report.md (mean ± std over seeds per metric per variant), report.json (every number), metrics.png
(bars with ±std) and samples.png (each variant's seed-0 sample grid side by side).

Runs resume: finished stages and evaluations (runs/<name>/eval.json) are reused, so an interrupted
study continues where it stopped. What is evaluated, on which data, is in `EvalConfig`.
"""
from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastdae import metrics as M
from fastdae.config import MODES, TrainConfig, apply_overrides, load_config
from fastdae.data import DataConfig, ProceduralShapes, build_dataset

ARMS = MODES  # ("dae", "joint", "control")
KNOBS = ("width_mult", "num_res_blocks", "dropout")  # WeakDecoderConfig fields

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


@dataclass
class EvalConfig:
    """How runs are judged.

    Real data: for the procedural dataset, `eval_images` held-out images (ProceduralShapes with seed
    data.seed + 1, never trained on); the classifier trains on `classifier_images` of seed data.seed + 2;
    the FD-feat floor uses prior.num_samples images of seed data.seed + 3. For other datasets all three
    are slices of the training set (not held out), and the classifier needs >= 2 labelled classes.
    Reconstructions: images -> frozen encoder -> bottleneck (VQ codes / KL mean) -> final decoder.
    Complexity probes run on scale-normalised latents (per-channel mean/std of the run's cache):
    Lipschitz bound over `lipschitz_pairs` pairs of held-out latents, Jacobian norms at the first
    `probe_latents`; minimal capacity fits Decoder(width, the run's ch_mult and res blocks) for each of
    `capacity_widths` to `capacity_images` training latents for `capacity_steps` Adam steps and
    reports the smallest width whose MSE reaches PSNR `capacity_target_psnr`; the penalised distance
    takes that family with FD-feat as d_F, the Jacobian spectral norm as C and lambda = `lam`.
    `inception`: a local pytorch-fid pt_inception-2015-12-05 file adds FID / rFID; `lpips_trunk` /
    `lpips_lin` (default: the config's stage-1 LPIPS files) add LPIPS."""

    eval_images: int = 512
    classifier_images: int = 8192
    classifier_steps: int = 600
    validity_threshold: float = M.VALIDITY_THRESHOLD
    lipschitz_pairs: int = 64
    probe_latents: int = 32
    capacity_images: int = 512
    capacity_widths: list[int] = field(default_factory=lambda: [8, 16, 32])
    capacity_steps: int = 300
    capacity_target_psnr: float = 20.0
    lam: float = 1.0
    inception: str | None = None
    lpips_trunk: str | None = None
    lpips_lin: str | None = None
    batch_size: int = 128


def _device(cfg: TrainConfig) -> torch.device:
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def _images(data: DataConfig, n: int, seed_offset: int, start: int = 0) -> tuple[Tensor, Tensor]:
    """n images (and labels) of the study's data: held-out procedural images of seed data.seed +
    seed_offset, or items [start, start + n) of any other dataset."""
    if data.name == "shapes":
        ds = ProceduralShapes(n, data.size, data.seed + seed_offset)
        return ds.images(np.arange(n))
    ds = build_dataset(data)
    idx = [i % len(ds) for i in range(start, start + n)]
    images, labels = zip(*(ds[i] for i in idx))
    return torch.stack(images), torch.stack(labels)


class _TensorDataset(torch.utils.data.Dataset):
    def __init__(self, images: Tensor, labels: Tensor, num_classes: int) -> None:
        self.images, self.labels, self.num_classes = images, labels, num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]


@dataclass
class Judge:
    """What every run is measured against: held-out real images, the dataset classifier (FD-feat,
    validity), the optional FID Inception and LPIPS, and reference values of real data."""

    images: Tensor
    labels: Tensor
    classifier: nn.Module | None
    inception: nn.Module | None
    lpips: nn.Module | None
    stats: dict[str, M.GaussianStats]  # feature-space name -> stats of the real images
    reference: dict[str, Any]


def _dataset_classifier(cfg: TrainConfig, ev: EvalConfig, num_classes: int, out_dir: Path, log: Any) -> nn.Module:
    """The study's classifier: trained once, kept in out_dir/judge/ with what it was trained on, and
    reused by a later call with the same data and classifier settings (a resumed study)."""
    from safetensors.torch import load_file, save_file

    from fastdae.models.classifier import ShapeClassifier, train_classifier

    identity = {"data": asdict(cfg.data), "classifier_images": ev.classifier_images,
                "classifier_steps": ev.classifier_steps, "start": ev.eval_images, "num_classes": num_classes}
    root = out_dir / "judge"
    weights, meta = root / "classifier.safetensors", root / "classifier.json"
    device = _device(cfg)
    if weights.is_file() and meta.is_file() and json.loads(meta.read_text()) == identity:
        model = ShapeClassifier(num_classes)
        model.load_state_dict(load_file(str(weights)))
        return model.to(device).eval()
    x, y = _images(cfg.data, ev.classifier_images, seed_offset=2, start=ev.eval_images)
    t0 = time.perf_counter()
    model = train_classifier(_TensorDataset(x, y, num_classes), steps=ev.classifier_steps, device=device)
    log(f"judge: classifier trained in {time.perf_counter() - t0:.0f} s")
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta.write_text(json.dumps(identity))
    return model


def build_judge(cfg: TrainConfig, ev: EvalConfig, out_dir: Path, log: Any = print) -> Judge:
    from fastdae.models.classifier import classifier_accuracy

    device = _device(cfg)
    images, labels = _images(cfg.data, ev.eval_images, seed_offset=1)
    num_classes = int(labels.max()) + 1
    reference: dict[str, Any] = {"eval_images": len(images)}
    classifier = None
    if num_classes >= 2:
        classifier = _dataset_classifier(cfg, ev, num_classes, out_dir, log)
        reference["classifier_accuracy"] = classifier_accuracy(classifier, _TensorDataset(images, labels, num_classes))
        log(f"judge: classifier held-out accuracy {reference['classifier_accuracy']:.3f}")
    inception = None
    if ev.inception:
        from fastdae.models.inception import FIDInceptionV3

        inception = FIDInceptionV3.from_file(ev.inception).to(device)
    trunk, lin = ev.lpips_trunk or cfg.stage1.lpips_trunk, ev.lpips_lin or cfg.stage1.lpips_lin
    lpips = None
    if trunk:
        from fastdae.nn import LPIPS

        lpips = LPIPS(trunk_weights=trunk, lin_weights=lin).to(device)
    stats = {M.frechet_name(f): M.gaussian_stats(M.extract_features(f, images, ev.batch_size))
             for f in (classifier, inception) if f is not None}
    if classifier is not None:
        # the floor a perfect generator would reach with as many samples as the runs draw
        floor, floor_labels = _images(cfg.data, cfg.prior.num_samples, seed_offset=3, start=ev.eval_images)
        reference["fd_feat_real"] = M.frechet_score(classifier, floor, stats["FD-feat"], ev.batch_size)
        real = M.sample_validity(classifier, floor, floor_labels, ev.validity_threshold)
        reference["validity_real"], reference["class_accuracy_real"] = real["validity"], real["class_accuracy"]
    return Judge(images, labels, classifier, inception, lpips, stats, reference)


def _load_autoencoder(run_cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The run's frozen encoder and bottleneck (stage 1) and final decoder (stage 1's in mode joint,
    else stage 2's), in eval mode."""
    from fastdae.models.autoencoder import build_bottleneck, build_decoder, build_encoder
    from fastdae.training.checkpoint import load_weights

    run, ae = Path(run_cfg.out_dir), run_cfg.autoencoder
    encoder, bottleneck, decoder = build_encoder(ae), build_bottleneck(ae), build_decoder(ae)
    load_weights(run / "stage1" / "encoder.safetensors", encoder, prefix="encoder.")
    load_weights(run / "stage1" / "encoder.safetensors", bottleneck, prefix="bottleneck.")
    load_weights(run / ("stage1" if run_cfg.mode == "joint" else "stage2") / "decoder.safetensors", decoder)
    return tuple(m.to(device).eval().requires_grad_(False) for m in (encoder, bottleneck, decoder))  # type: ignore[return-value]


@torch.no_grad()
def _encode(encoder: nn.Module, bottleneck: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """Deterministic latents (N, C, h, w): VQ codebook vectors, or the KL posterior mean."""
    device = next(encoder.parameters()).device
    return torch.cat([bottleneck.encode_fields(encoder(x.to(device)))[1] for x in images.split(batch_size)])


def _final_prior_loss(run: Path) -> float:
    """The DiT's final training loss: mean of the last 10% of logged steps (at least one row)."""
    with open(run / "prior" / "log.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    return float(np.mean(losses[-max(1, len(losses) // 10):]))


def evaluate_run(run_cfg: TrainConfig, judge: Judge, ev: EvalConfig) -> dict[str, Any]:
    """Every metric of PAPER.md §5 for one finished run (see EvalConfig for what is measured how)."""
    from safetensors.torch import load_file

    from fastdae.cache import LatentCache
    from fastdae.models.autoencoder import Decoder

    run, ae, device = Path(run_cfg.out_dir), run_cfg.autoencoder, _device(run_cfg)
    encoder, bottleneck, decoder = _load_autoencoder(run_cfg, device)
    out: dict[str, Any] = {}
    # reconstruction of held-out images
    x = judge.images
    z = _encode(encoder, bottleneck, x, ev.batch_size)
    with torch.no_grad():
        x_hat = torch.cat([decoder(c) for c in z.split(ev.batch_size)]).clamp(-1, 1).cpu()
    out["psnr"], out["ssim"] = M.psnr(x, x_hat).mean().item(), M.ssim(x, x_hat).mean().item()
    if judge.lpips is not None:
        out["lpips"] = M.lpips_distance(x.to(device), x_hat.to(device), judge.lpips).mean().item()
    # generation: the run's decoded DiT samples
    saved = load_file(str(run / "samples" / "images.safetensors"))
    samples, labels = saved["images"], saved.get("labels")
    for f in (judge.classifier, judge.inception):
        if f is not None:
            out[M.frechet_name(f, reconstruction=True).lower().replace("-", "_")] = M.frechet_score(
                f, x_hat, judge.stats[M.frechet_name(f)], ev.batch_size)
            out[M.frechet_name(f).lower().replace("-", "_")] = M.frechet_score(
                f, samples, judge.stats[M.frechet_name(f)], ev.batch_size)
    if judge.classifier is not None:
        out.update(M.sample_validity(judge.classifier, samples, labels, ev.validity_threshold))
    out["num_samples"] = len(samples)
    out["prior_loss"] = _final_prior_loss(run)
    # decoder complexity on scale-normalised latents (the cache's per-channel statistics)
    cache = LatentCache(run / "cache", verify="lazy")
    dec_n, z_n = M.scale_normalize(decoder, z, cache.channel_mean, cache.channel_std)
    probe = z_n[:ev.probe_latents]
    out["lipschitz"] = M.lipschitz_lower_bound(dec_n, z_n, pairs=ev.lipschitz_pairs, seed=run_cfg.seed)
    out["jac_spectral"] = M.jacobian_spectral_norm(dec_n, probe, seed=run_cfg.seed)
    out["jac_frobenius_sq"], out["jac_frobenius"] = M.jacobian_frobenius_hutchinson(dec_n, probe, seed=run_cfg.seed)
    # capacity and the penalised distance: decoders of each width fitted to frozen training latents
    x_train, _ = _images(run_cfg.data, ev.capacity_images, seed_offset=0)
    _, z_train = M.scale_normalize(decoder, _encode(encoder, bottleneck, x_train, ev.batch_size),
                                   cache.channel_mean, cache.channel_std)
    target = M.DATA_RANGE**2 / 10 ** (ev.capacity_target_psnr / 10)  # PSNR -> MSE

    def make_decoder(width: int) -> nn.Module:
        return Decoder(width, ae.ch_mult, ae.num_res_blocks, ae.z_channels, ae.attn)

    out["min_width"], family = M.minimal_capacity(make_decoder, z_train, x_train.to(device), ev.capacity_widths,
                                                  target, ev.capacity_steps, seed=run_cfg.seed)
    out["capacity_curve"] = [f.summary() for f in family]
    if judge.classifier is not None:
        pd = M.penalised_distance(family, z_train, x_train.to(device), judge.classifier, ev.lam, "spectral",
                                  ev.probe_latents, ev.batch_size, run_cfg.seed)
        out["penalised_distance"], out["penalised_terms"] = pd["value"], pd
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    """{mean, std (over seeds, ddof 1; 0 for one seed), n}."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def _summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> metric -> {mean, std, n} (_mean_std); None values (e.g. no width reached the
    capacity target) are left out and n says how many counted ({"n": 0}: None in every run, shown
    as "none" in the table)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant, results in runs.items():
        out[variant] = {}
        for key, _, _ in METRICS:
            values = [r[key] for r in results if r.get(key) is not None]
            if values:
                out[variant][key] = _mean_std(values)
            elif any(key in r for r in results):  # measured, but None in every run
                out[variant][key] = {"n": 0}
    return out


def _capacity_curves(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> decoder width -> PSNR (dB) {mean, std, n} of the fresh decoders the minimal-capacity
    probe fitted to each run's frozen latents: the whole curve, of which min_width reads one point."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant, results in runs.items():
        psnrs: dict[int, list[float]] = {}
        for r in results:
            for point in r.get("capacity_curve", []):
                psnrs.setdefault(point["width"], []).append(10 * math.log10(M.DATA_RANGE**2 / point["error"]))
        out[variant] = {str(w): _mean_std(v) for w, v in sorted(psnrs.items())}
    return out


def _run_study(cfg: TrainConfig, variants: dict[str, dict[str, Any]], seeds: int, out_dir: Path, ev: EvalConfig,
               title: str, command: str | None, log: Any) -> dict[str, Any]:
    """Train and evaluate every variant (config overrides) for seeds 0..seeds-1; write the report."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = build_judge(cfg, ev, out_dir, log)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for s in range(seeds):  # seeds outermost: a study stopped early still has every variant at equal seeds
        for name, overrides in variants.items():
            run_dir = out_dir / "runs" / f"{name}-s{s}"
            run_cfg = apply_overrides(cfg, {**overrides, "seed": s, "out_dir": str(run_dir), "resume": True})
            eval_file = run_dir / "eval.json"
            if eval_file.is_file():  # finished earlier: reuse
                runs[name].append(json.loads(eval_file.read_text()))
                continue
            from fastdae.training import train

            t0 = time.perf_counter()
            summary = train(run_cfg).metrics
            result = evaluate_run(run_cfg, judge, ev)
            result["train_wall_s"] = summary["wall_s"]
            eval_file.write_text(json.dumps(result, indent=1))
            log(f"{name} seed {s}: trained and evaluated in {time.perf_counter() - t0:.0f} s")
            runs[name].append(result)
    report = {"title": title, "command": command, "config": cfg.to_dict(), "eval": asdict(ev), "seeds": seeds,
              "reference": judge.reference, "summary": _summarize(runs),
              "capacity": _capacity_curves(runs), "runs": runs,
              "device": str(_device(cfg)), "torch": torch.__version__}
    write_report(report, out_dir)
    return report


def compare(config: TrainConfig | dict | str | Path, arms: Sequence[str] = ("joint", "dae", "control"), seeds: int = 3,
            out_dir: str | Path = "results/compare", eval_config: EvalConfig | None = None, command: str | None = None,
            log: Any = print) -> dict[str, Any]:
    """PAPER.md §5: the arms at equal compute, `seeds` seeds each; returns the report dict (also
    written to out_dir as report.md / report.json / metrics.png / samples.png)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"arms must be a non-empty subset of {ARMS}, got {list(arms)}")
    cfg = load_config(config)
    return _run_study(cfg, {a: {"mode": a} for a in arms}, seeds, Path(out_dir), eval_config or EvalConfig(),
                      "DAE comparison (PAPER.md §5)", command, log)


def ablation(config: TrainConfig | dict | str | Path, knob: str, values: Sequence[Any], seeds: int = 2,
             out_dir: str | Path = "results/ablation", eval_config: EvalConfig | None = None, select: str = "fd_feat",
             command: str | None = None, log: Any = print) -> dict[str, Any]:
    """The weakening knob of the auxiliary decoder (weak_decoder.<knob> in KNOBS) over `values`, in
    mode dae; report["best"] is the value with the best mean `select` metric."""
    if knob not in KNOBS:
        raise ValueError(f"knob must be one of {KNOBS}, got {knob!r}")
    directions = {k: d for k, _, d in METRICS}
    if select not in directions:
        raise ValueError(f"select must be one of {sorted(directions)}, got {select!r}")
    cfg = load_config(config)
    variants = {f"{knob}={v}": {"mode": "dae", f"weak_decoder.{knob}": v} for v in values}
    report = _run_study(cfg, variants, seeds, Path(out_dir), eval_config or EvalConfig(),
                        f"Ablation of weak_decoder.{knob} (mode dae)", command, log)
    scored = {name: s[select]["mean"] for name, s in report["summary"].items() if select in s}
    if scored:
        best = (max if directions[select] > 0 else min)(scored, key=scored.get)
        report["best"] = {"variant": best, "select": select, "mean": scored[best]}
        write_report(report, Path(out_dir))
    return report


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def markdown(report: dict[str, Any]) -> str:
    variants = list(report["summary"])
    lines = [f"# {report['title']}", ""]
    if report.get("command"):
        lines += ["Command:", "", f"    {report['command']}", ""]
    lines += [f"{report['seeds']} seed(s) per variant, mean ± std (sample std over seeds; n = seeds counted "
              f"when fewer). Device {report['device']}, torch {report['torch']}.", "",
              "| metric | better | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for key, label, direction in METRICS:
        cells = []
        for v in variants:
            s = report["summary"][v].get(key)
            n = f" (n={s['n']})" if s and s["n"] < report["seeds"] else ""
            cells.append("—" if not s else "none" if s["n"] == 0 else f"{_fmt(s['mean'])} ± {_fmt(s['std'])}{n}")
        if any(c != "—" for c in cells):
            lines.append(f"| {label} | {'↑' if direction > 0 else '↓'} | " + " | ".join(cells) + " |")
    capacity = report.get("capacity", {})
    widths = sorted({int(w) for c in capacity.values() for w in c})
    if widths:
        ev = report["eval"]
        lines += ["", f"Minimal-capacity probe: PSNR (dB) of a fresh decoder of each width fitted to the frozen "
                  f"latents ({ev['capacity_images']} training images, {ev['capacity_steps']} Adam steps); "
                  f"\"minimal decoder width\" above is the first width reaching {ev['capacity_target_psnr']:g} dB.",
                  "", "| width | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for w in widths:
            cells = [f"{_fmt(c['mean'])} ± {_fmt(c['std'])}" if (c := capacity.get(v, {}).get(str(w))) else "—"
                     for v in variants]
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
    ref = report["reference"]
    lines += ["", "Reference (real held-out images): " + ", ".join(f"{k} = {_fmt(v) if isinstance(v, float) else v}"
                                                             for k, v in ref.items())]
    if "best" in report:
        b = report["best"]
        lines += ["", f"Best by {b['select']}: **{b['variant']}** ({_fmt(b['mean'])})."]
    lines += ["", "Metric definitions: fastdae/compare.py (EvalConfig) and fastdae/metrics.py. FD-feat is a "
              "Fréchet distance in the features of a classifier trained on the dataset, not FID. "
              "\"none\": no run had a value (minimal width: no width reached the target error).",
              "", "![metrics](metrics.png)", "", "![samples](samples.png)", ""]
    return "\n".join(lines)


def _draw_metric_bars(report: dict[str, Any], path: Path) -> None:
    """One panel per metric: a bar per variant (mean) with a ±std whisker. Pillow only."""
    from PIL import Image, ImageDraw

    variants = list(report["summary"])
    keys = [(k, label) for k, label, _ in METRICS if any(k in report["summary"][v] for v in variants)]
    pw, ph, cols = 240, 170, 4
    rows = max(1, math.ceil(len(keys) / cols))
    img = Image.new("RGB", (cols * pw, rows * ph), "white")
    draw = ImageDraw.Draw(img)
    colours = [(66, 133, 244), (219, 68, 55), (15, 157, 88), (244, 180, 0), (171, 71, 188), (0, 172, 193)]
    for i, (key, label) in enumerate(keys):
        x0, y0 = (i % cols) * pw, (i // cols) * ph
        draw.text((x0 + 6, y0 + 4), label, fill="black")
        stats = [report["summary"][v].get(key) for v in variants]
        top = max((s["mean"] + s["std"] for s in stats if s and s["n"]), default=1.0)
        top = top if top > 0 else 1.0
        base, height, bw = y0 + ph - 24, ph - 50, (pw - 20) // max(1, len(variants))
        for j, (v, s) in enumerate(zip(variants, stats)):
            bx = x0 + 10 + j * bw
            draw.text((bx + 2, base + 4), v[:12], fill="black")
            if not s or s["n"] == 0:
                continue
            h = max(0.0, s["mean"]) / top * height
            draw.rectangle([bx + 4, base - h, bx + bw - 4, base], fill=colours[j % len(colours)])
            lo, hi = (max(0.0, s["mean"] - s["std"]) / top * height, (s["mean"] + s["std"]) / top * height)
            cx = bx + bw // 2
            draw.line([cx, base - lo, cx, base - hi], fill="black", width=1)
            draw.text((bx + 4, base - h - 12), _fmt(s["mean"]), fill="black")
        draw.rectangle([x0, y0, x0 + pw - 1, y0 + ph - 1], outline=(200, 200, 200))
    img.save(path)


def _draw_sample_grids(report: dict[str, Any], out_dir: Path, path: Path) -> None:
    """Each variant's seed-0 sample grid (runs/<variant>-s0/samples/grid.png), side by side, labelled."""
    from PIL import Image, ImageDraw

    grids = {v: out_dir / "runs" / f"{v}-s0" / "samples" / "grid.png" for v in report["summary"]}
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
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(markdown(report))
    _draw_metric_bars(report, out_dir / "metrics.png")
    _draw_sample_grids(report, out_dir, out_dir / "samples.png")
