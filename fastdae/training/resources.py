"""`RunResources`: what every stage of a run shares, built once: the process/device setup, the dataset
(its training split) and its fingerprint, the pretrained stage-1 source, the latent cache and the
frozen bottleneck as later stages read them (checked against the encoder file's sha256 and the
dataset fingerprint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastdae import files
from fastdae.config import TrainConfig, load_config
from fastdae.precision import autocast
from fastdae.training.checkpoint import load_weights
from fastdae.training.distributed import setup_distributed
from fastdae.training.identity import RunError

if TYPE_CHECKING:  # the trainer imports integrations only when stage1.encoder is set
    from fastdae.cache import LatentCache
    from fastdae.data import ImageDataset
    from fastdae.models.autoencoder import Decoder, KLBottleneck, VQBottleneck
    from fastdae.pretrained.diffusers_vae import DiffusersDecoder, FrozenStage1
    from fastdae.pretrained.taming_vqgan import TamingDecoder

from fastdae.training.paths import CONFIG_FILE, MissingOutputError, RunFolder

R = TypeVar("R", bound="RunResources")


class RunResources(RunFolder):
    """A run in progress: the folder's layout (RunFolder) plus processes, device, dataset, cache and
    the identity checks (see the module docstring)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.dist, self.device = setup_distributed(cfg.device)
        self.resume_from: dict[str, Path | None] = {}
        self._sha: dict[Path, tuple[tuple[int, int], str]] = {}
        self.stage: str | None = None  # the stage running now (Run.begin): the precision policy is per stage

    @classmethod
    def open(cls: type[R], root: str | os.PathLike, device: str = "auto") -> R:
        """The existing run folder `root` as its config.yaml describes it (out_dir: `root`, wherever it
        was trained), on `device`: for reading what its stages wrote."""
        root = Path(root)
        if not (root / CONFIG_FILE).is_file():
            raise MissingOutputError(f"{root / CONFIG_FILE} does not exist: {root} is not a fastdae run folder")
        cfg = dataclasses.replace(load_config(root / CONFIG_FILE), out_dir=str(root), device=device)
        return cls(cfg)

    def total_steps(self, stage: str) -> tuple[str, int]:
        """(config key, steps) of a checkpointed stage; joint trains stage 1 for both budgets."""
        c = self.cfg
        if stage == "stage1" and c.mode == "joint":
            return "stage1.steps + stage2.steps", c.stage1.steps + c.stage2.steps
        return f"{stage}.steps", getattr(c, stage).steps

    @cached_property
    def dataset(self) -> ImageDataset:
        """The training part of the configured dataset (fastdae.data.split_dataset): the held-out part
        is for evaluation only and never reaches stage 1, the cache, stage 2 or the prior."""
        from fastdae.data import build_dataset, split_dataset

        return split_dataset(build_dataset(self.cfg.data), self.cfg.data)[0]

    @cached_property
    def fingerprint(self) -> str:
        from fastdae.data import dataset_fingerprint

        return dataset_fingerprint(self.dataset)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The running stage's autocast (fastdae.precision: on CPU, bf16 only where it pays)."""
        return autocast(self.device, self.cfg.precision, self.stage)

    @property
    def fp16(self) -> bool:
        """fp16 autocast: the Updaters scale the loss (GradScaler)."""
        return self.cfg.precision == "fp16"

    def per_rank(self, key: str) -> int:
        """The per-rank share of the global batch size at `key` (checked in prepare)."""
        return getattr(self.cfg, key.split(".")[0]).batch_size // self.dist.world_size

    def require(self, path: Path, stage: str) -> Path:
        if not path.is_file():
            raise MissingOutputError(
                f"{path} does not exist: run {stage} first (stages=['{stage}', ...]) in {self.root}"
            )
        return path

    def sha256(self, path: Path) -> str:
        """sha256 of a file, hashed again only when its size or mtime changed."""
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns)
        if self._sha.get(path, (None, ""))[0] != key:
            self._sha[path] = (key, files.sha256_file(path))
        return self._sha[path][1]

    @cached_property
    def pretrained_stage1(self) -> FrozenStage1 | None:
        """stage1.encoder (a diffusers AutoencoderKL / VQModel or taming VQGAN folder) loaded frozen on this
        run's device, a fastdae.pretrained.diffusers_vae.FrozenStage1; None when stage 1 is fastdae's own."""
        if self.cfg.stage1.encoder is None:
            return None
        from fastdae.pretrained.source import load_stage1

        return load_stage1(self.cfg.stage1.encoder, self.cfg.stage1.posterior, self.device)

    def encoder_sha256(self) -> str:
        """Identity of the frozen encoder the cache is built from: stage1/encoder.safetensors' sha256, or
        the pretrained encoder's (class, config and encoder-side tensors)."""
        if self.pretrained_stage1 is not None:
            return self.pretrained_stage1.sha256
        return self.verified_sha256(self.encoder_file, "stage1")

    def verified_sha256(self, path: Path, stage: str) -> str:
        """sha256 of a weight file `stage` wrote, checked against the one it recorded when it wrote it
        (metrics.json "weights"): a file changed since (a flipped bit) is refused, never decoded with.
        A run of an older fastdae recorded none: its files are hashed unchecked."""
        digest = self.sha256(self.require(path, stage))
        recorded = self._metrics(stage).get("weights", {})
        want = recorded.get(path.name) if isinstance(recorded, dict) else None
        if want is None or want == digest:
            return digest
        raise RunError(
            f"{path} changed after {stage} wrote it (corrupted or replaced): its sha256 is {digest[:16]}..., "
            f"{stage} recorded {str(want)[:16]}... in {self.metrics_file(stage).name}; train {stage} again "
            f"(stages=['{stage}', ...])"
        )

    def _metrics(self, stage: str) -> dict[str, Any]:
        """metrics.json of a finished stage ({} when absent); RunError when it is no JSON object."""
        path = self.metrics_file(stage)
        if not path.is_file():
            return {}
        data = files.read_json_object(path)
        if data is None:
            raise RunError(f"{path} is not a stage's metrics (edited or corrupted); train {stage} again")
        return data

    # the latent the cache holds: fastdae's autoencoder config, or what stage1.encoder produces
    @property
    def latent_channels(self) -> int:
        pre = self.pretrained_stage1
        return self.cfg.autoencoder.z_channels if pre is None else pre.latent_channels

    @property
    def downsample(self) -> int:
        pre = self.pretrained_stage1
        return self.cfg.autoencoder.downsample if pre is None else pre.downsample

    @property
    def bottleneck_kind(self) -> str:
        pre = self.pretrained_stage1
        return self.cfg.autoencoder.bottleneck if pre is None else pre.kind

    def build_decoder(self) -> Decoder | DiffusersDecoder | TamingDecoder:
        """A fresh full decoder: fastdae's (autoencoder config) or, with stage1.encoder, one in its architecture."""
        source = self.cfg.stage1.encoder
        if source is None:
            from fastdae.models.autoencoder import build_decoder

            return build_decoder(self.cfg.autoencoder)
        from fastdae.pretrained.source import build_decoder as build_pretrained_decoder

        return build_pretrained_decoder(source)

    def open_cache(self) -> LatentCache:
        """run/cache, verified against the frozen encoder it was built from and this run's dataset."""
        from fastdae.cache import LatentCache

        cache = LatentCache(self.cache_dir, verify="lazy")
        cache.check(encoder_sha256=self.encoder_sha256(), dataset_fingerprint=self.fingerprint)
        return cache

    def frozen_bottleneck(self) -> VQBottleneck | KLBottleneck:
        """The frozen bottleneck (VQ codebook) in eval mode: stage 1's, from stage1/encoder.safetensors,
        or the pretrained encoder's."""
        if self.pretrained_stage1 is not None:
            return self.pretrained_stage1.bottleneck
        from fastdae.models.autoencoder import build_bottleneck

        bottleneck = build_bottleneck(self.cfg.autoencoder)
        load_weights(self.require(self.encoder_file, "stage1"), bottleneck, prefix="bottleneck.")
        return bottleneck.to(self.device).eval().requires_grad_(False)

    def num_classes(self) -> int:
        """Classes the DiT is conditioned on (0: unconditional): the whole dataset's `num_classes`."""
        return int(self.dataset.num_classes) if self.cfg.prior.class_cond else 0
