"""The judge every run of a study is measured against: held-out real images, the dataset classifier
(FD-feat, validity), the optional FID Inception and LPIPS, reference values of real data; and
`EvalConfig`, what is evaluated on which data."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from fastdae import files
from fastdae import measure as M
from fastdae.cache.format import gather_images
from fastdae.config import TrainConfig
from fastdae.data import (
    DataConfig,
    DataError,
    DatasetSplit,
    ProceduralDataset,
    build_dataset,
    dataset_fingerprint,
    split_dataset,
)

PARTS = ("eval", "floor", "classifier")  # the judge's runs of the held-out split, in this order


@dataclass
class EvalConfig:
    """How runs are judged.

    Real data: only the held-out split of the dataset (fastdae.data.split_dataset, DataConfig.holdout),
    which training never sees, cut into three disjoint runs (`judge_parts`): "eval", `eval_images`
    images (reconstructions, the real feature statistics FD-feat compares with, and the classifier's
    reported accuracy); "floor", prior.num_samples images scored like samples (the FD-feat a perfect
    generator would reach, validity and class accuracy of real images); "classifier", up to
    `classifier_images` images the classifier trains on. A held-out split too small for all three
    gives the classifier half and the other two the rest in proportion. The classifier needs >= 2 classes.
    Reconstructions: images -> frozen encoder -> bottleneck (VQ codes / KL mean) -> final decoder.
    Complexity probes run on scale-normalised latents (per-channel mean/std of the run's cache):
    Lipschitz bound over `lipschitz_pairs` pairs of held-out latents, Jacobian norms at the first
    `probe_latents`; minimal capacity fits Decoder(width, the run's ch_mult and res blocks) for each of
    `capacity_widths` to the first `capacity_images` training latents (all, if fewer) for
    `capacity_steps` Adam steps and reports the smallest width whose MSE reaches PSNR
    `capacity_target_psnr`; the penalised distance
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


def judge_parts(heldout: int, eval_images: int, floor_images: int, classifier_images: int) -> dict[str, range]:
    """The runs of a held-out split of `heldout` items that each part uses (see EvalConfig)."""
    e, f, c = eval_images, floor_images, classifier_images
    if e + f + c > heldout:  # too few: the classifier gets half, eval and floor the rest in proportion
        c = min(c, heldout // 2)
        rest = heldout - c
        e = min(e, round(rest * e / (e + f)))
        f = min(f, rest - e)
    ends = np.cumsum([e, f, c]).tolist()
    return {name: range(end - n, end) for name, n, end in zip(PARTS, (e, f, c), ends, strict=True)}


def training_images(data: DataConfig, n: int) -> Tensor:
    """The first n images of the training split (all, if fewer): (n, 3, H, W)."""
    train, _ = split_dataset(build_dataset(data), data)
    return gather_images(train, np.arange(min(n, len(train))))[0]


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
    validity), the optional FID Inception and LPIPS, and reference values of real data. `indices`:
    each part's items as indices into the dataset `build_dataset` returns (generator indices for a
    procedural dataset), all from the held-out split; `split`: the item counts of the split and of
    each part."""

    images: Tensor
    labels: Tensor
    classifier: nn.Module | None
    inception: nn.Module | None
    lpips: nn.Module | None
    stats: dict[str, M.GaussianStats]  # feature-space name -> stats of the real images
    reference: dict[str, Any]
    indices: dict[str, np.ndarray]
    split: dict[str, int]


def _base_indices(heldout: Dataset, part: range) -> np.ndarray:
    """Indices into the whole dataset of a run of the held-out split (generator indices for a
    procedural dataset)."""
    if isinstance(heldout, ProceduralDataset):
        return heldout.offset + np.arange(part.start, part.stop, dtype=np.int64)
    return heldout.indices[part.start : part.stop]


def _part(heldout: Dataset, part: range, name: str) -> Dataset:
    """A non-empty run of the held-out split as a dataset with its own identity (for fingerprints)."""
    if isinstance(heldout, ProceduralDataset):
        return heldout.part(part.start, part.stop)
    return DatasetSplit(heldout.base, _base_indices(heldout, part), name)


def _dataset_classifier(
    cfg: TrainConfig, ev: EvalConfig, part: Dataset, num_classes: int, out_dir: Path, log: Any
) -> nn.Module:
    """The study's classifier, trained on the held-out "classifier" part only: trained once, kept in
    out_dir/judge/ with what it was trained on, and reused by a later call with the same data and
    classifier settings (a resumed study)."""
    from safetensors.torch import load_file, save_file

    from fastdae.models.classifier import ShapeClassifier, train_classifier

    identity = {
        "data": asdict(cfg.data),
        "classifier_steps": ev.classifier_steps,
        "num_classes": num_classes,
        "images": len(part),
        "fingerprint": dataset_fingerprint(part),
    }
    root = out_dir / "judge"
    weights, meta = root / "classifier.safetensors", root / "classifier.json"
    device = device_of(cfg)
    if weights.is_file() and files.read_json_object(meta) == identity:
        model = ShapeClassifier(num_classes)
        model.load_state_dict(load_file(str(weights)))
        return model.to(device).eval()
    x, y = gather_images(part, np.arange(len(part)))
    t0 = time.perf_counter()
    model = train_classifier(_TensorDataset(x, y, num_classes), steps=ev.classifier_steps, device=device)
    log(f"judge: classifier trained on {len(part)} held-out images in {time.perf_counter() - t0:.0f} s")
    root.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    files.write_json(meta, identity)
    return model


def build_judge(cfg: TrainConfig, ev: EvalConfig, out_dir: Path, log: Any = print) -> Judge:
    from fastdae.models.classifier import classifier_accuracy

    device = device_of(cfg)
    data = build_dataset(cfg.data)
    train, heldout = split_dataset(data, cfg.data)
    num_classes = int(data.num_classes)
    ranges = judge_parts(len(heldout), ev.eval_images, cfg.prior.num_samples, ev.classifier_images)
    split = {
        "train_items": len(train),
        "heldout_items": len(heldout),
        **{f"{k}_images": len(r) for k, r in ranges.items()},
    }
    if len(ranges["eval"]) < 2:
        raise DataError(
            f"the held-out split has {len(heldout)} items, too few for the judge (it needs >= 2 "
            f"evaluation images); raise data.holdout"
        )
    images, labels = gather_images(heldout, np.asarray(ranges["eval"]))  # (e, 3, H, W), (e,)
    reference: dict[str, Any] = {"eval_images": len(images), "num_classes": num_classes}
    classifier = None
    if num_classes >= 2:
        classifier = _dataset_classifier(
            cfg, ev, _part(heldout, ranges["classifier"], "classifier"), num_classes, out_dir, log
        )
        reference["classifier_accuracy"] = classifier_accuracy(classifier, _TensorDataset(images, labels, num_classes))
        log(
            f"judge: classifier accuracy {reference['classifier_accuracy']:.3f} on the {len(images)} held-out "
            f"evaluation images (trained on the {len(ranges['classifier'])} held-out classifier images)"
        )
    inception = None
    if ev.inception:
        from fastdae.models.inception import FIDInceptionV3

        inception = FIDInceptionV3.from_file(ev.inception).to(device)
    trunk, lin = ev.lpips_trunk or cfg.stage1.lpips_trunk, ev.lpips_lin or cfg.stage1.lpips_lin
    lpips = None
    if trunk:
        from fastdae.nn import LPIPS

        lpips = LPIPS(trunk_weights=trunk, lin_weights=lin).to(device)
    stats = {
        M.frechet_name(f): M.gaussian_stats(M.extract_features(f, images, ev.batch_size))
        for f in (classifier, inception)
        if f is not None
    }
    if classifier is not None and len(ranges["floor"]) >= 2:
        # the floor a perfect generator would reach with as many samples as the runs draw
        floor, floor_labels = gather_images(heldout, np.asarray(ranges["floor"]))
        reference["fd_feat_real"] = M.frechet_score(classifier, floor, stats["FD-feat"], ev.batch_size)
        real = M.sample_validity(classifier, floor, floor_labels, ev.validity_threshold)
        reference["validity_real"], reference["class_accuracy_real"] = real["validity"], real["class_accuracy"]
    indices = {name: _base_indices(heldout, r) for name, r in ranges.items()}
    return Judge(images, labels, classifier, inception, lpips, stats, reference, indices, split)
