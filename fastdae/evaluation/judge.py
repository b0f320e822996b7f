"""The judge every run of a study is measured against: held-out real images, the dataset classifier
(FD-feat, validity), the optional FID Inception and LPIPS, reference values of real data; and
`EvalConfig`, what is evaluated on which data."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastdae import files
from fastdae import metrics as M
from fastdae.config import TrainConfig
from fastdae.data import DataConfig, ProceduralShapes, build_dataset


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


def device_of(cfg: TrainConfig) -> torch.device:
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def images_of(data: DataConfig, n: int, seed_offset: int, start: int = 0) -> tuple[Tensor, Tensor]:
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
    device = device_of(cfg)
    if weights.is_file() and meta.is_file() and json.loads(meta.read_text()) == identity:
        model = ShapeClassifier(num_classes)
        model.load_state_dict(load_file(str(weights)))
        return model.to(device).eval()
    x, y = images_of(cfg.data, ev.classifier_images, seed_offset=2, start=ev.eval_images)
    t0 = time.perf_counter()
    model = train_classifier(_TensorDataset(x, y, num_classes), steps=ev.classifier_steps, device=device)
    log(f"judge: classifier trained in {time.perf_counter() - t0:.0f} s")
    root.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    files.write_json(meta, identity)
    return model


def build_judge(cfg: TrainConfig, ev: EvalConfig, out_dir: Path, log: Any = print) -> Judge:
    from fastdae.models.classifier import classifier_accuracy

    device = device_of(cfg)
    images, labels = images_of(cfg.data, ev.eval_images, seed_offset=1)
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
        floor, floor_labels = images_of(cfg.data, cfg.prior.num_samples, seed_offset=3, start=ev.eval_images)
        reference["fd_feat_real"] = M.frechet_score(classifier, floor, stats["FD-feat"], ev.batch_size)
        real = M.sample_validity(classifier, floor, floor_labels, ev.validity_threshold)
        reference["validity_real"], reference["class_accuracy_real"] = real["validity"], real["class_accuracy"]
    return Judge(images, labels, classifier, inception, lpips, stats, reference)
