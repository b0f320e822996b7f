"""`Run`: one run folder and what every stage shares. It owns

- the layout (every artefact path is a property here, nowhere else),
- the validated config, the process/device setup, the dataset (built once) and its fingerprint,
- the latent cache and the frozen bottleneck as later stages read them (checked against the encoder
  file's sha256 and the dataset fingerprint),
- the identity checks (fastdae.training.identity): `prepare()` before anything is trained or
  written, `begin(stage)` before each stage, `summarize()` after.

    run/config.yaml  summary.json  train.log
    run/<stage>/identity.json  metrics.json  log.csv  ckpt-*/  latest     (stage1, stage2, prior)
    run/stage1/encoder.safetensors  decoder.safetensors   run/stage2/decoder.safetensors
    run/cache/ (fastdae.LatentCache)   run/prior/dit.safetensors   run/samples/grid.png  images.safetensors
    run/judge/ (the classifier that scores the samples, prior.judge_steps)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from fastdae import files
from fastdae.config import STAGES, ConfigError, TrainConfig, load_config
from fastdae.training.checkpoint import checkpoint_step, latest_checkpoint, load_weights
from fastdae.training.distributed import autocast, setup_distributed
from fastdae.training.identity import RunError, config_identity, differences

if TYPE_CHECKING:  # the trainer imports integrations only when stage1.encoder is set
    from fastdae.integrations.diffusers_vae import FrozenStage1

log = logging.getLogger("fastdae.train")  # also the name fastdae.models.losses logs to
CONFIG_FILE = "config.yaml"
CHECKPOINTED = ("stage1", "stage2", "prior")  # stages that resume from checkpoints
DERIVED = ("cache", "samples")  # pure functions of their inputs and keys: redone, never resumed


class MissingOutputError(RunError, FileNotFoundError):
    """A stage needs what an earlier stage writes, and it is not there."""


@dataclass
class Result:
    """What a run left: its directory, every stage's metrics, and the paths of its outputs (None when
    the stage has not run)."""

    run_dir: Path
    metrics: dict[str, Any]
    checkpoints: dict[str, Path] = field(default_factory=dict)
    cache: Path | None = None
    sample_grid: Path | None = None
    summary: Path | None = None


class RunFolder:
    """The layout of a run folder: every artefact path (what evaluation reads too), nothing else."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.root = cfg, Path(cfg.out_dir)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    config_file = property(lambda self: self.root / CONFIG_FILE)
    summary_file = property(lambda self: self.root / "summary.json")
    log_file = property(lambda self: self.root / "train.log")
    cache_dir = property(lambda self: self.stage_dir("cache"))
    encoder_file = property(lambda self: self.stage_dir("stage1") / "encoder.safetensors")
    dit_file = property(lambda self: self.stage_dir("prior") / "dit.safetensors")
    sample_grid = property(lambda self: self.stage_dir("samples") / "grid.png")
    sample_images = property(lambda self: self.stage_dir("samples") / "images.safetensors")

    def export_dir(self, kind: str) -> Path:
        """stage2/diffusers or stage2/taming: the stage1.encoder source with the stage-2 decoder in its format."""
        return self.stage_dir("stage2") / kind

    def decoder_file(self, stage: str) -> Path:
        return self.stage_dir(stage) / "decoder.safetensors"

    @property
    def final_decoder_stage(self) -> str:
        """The decoder samples are decoded with: stage 2's, or stage 1's in mode "joint" (no stage 2)."""
        return "stage1" if self.cfg.mode == "joint" else "stage2"

    def identity_file(self, stage: str) -> Path:
        return self.stage_dir(stage) / "identity.json"

    def metrics_file(self, stage: str) -> Path:
        return self.stage_dir(stage) / "metrics.json"

    def log_csv(self, stage: str) -> Path:
        return self.stage_dir(stage) / "log.csv"


class Run(RunFolder):
    """A run in progress: the folder's layout (RunFolder) plus processes, device, dataset, cache and
    the identity checks (see the module docstring)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.dist, self.device = setup_distributed(cfg.device)
        self.resume_from: dict[str, Path | None] = {}
        self._sha: dict[Path, tuple[tuple[int, int], str]] = {}

    @classmethod
    def open(cls, root: str | os.PathLike, device: str = "auto") -> Run:
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
    def dataset(self) -> Any:
        """The training part of the configured dataset (fastdae.data.split_dataset): the held-out part
        is for evaluation only and never reaches stage 1, the cache, stage 2 or the prior."""
        from fastdae.data import build_dataset, split_dataset

        return split_dataset(build_dataset(self.cfg.data), self.cfg.data)[0]

    @cached_property
    def fingerprint(self) -> str:
        from fastdae.data import dataset_fingerprint

        return dataset_fingerprint(self.dataset)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.cfg.precision)

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
        run's device, a fastdae.integrations.diffusers_vae.FrozenStage1; None when stage 1 is fastdae's own."""
        if self.cfg.stage1.encoder is None:
            return None
        from fastdae.integrations.pretrained import load_stage1

        return load_stage1(self.cfg.stage1.encoder, self.cfg.stage1.posterior, self.device)

    def encoder_sha256(self) -> str:
        """Identity of the frozen encoder the cache is built from: stage1/encoder.safetensors' sha256, or
        the pretrained encoder's (class, config and encoder-side tensors)."""
        if self.pretrained_stage1 is not None:
            return self.pretrained_stage1.sha256
        return self.sha256(self.require(self.encoder_file, "stage1"))

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

    def build_decoder(self) -> nn.Module:
        """A fresh full decoder: fastdae's (autoencoder config) or, with stage1.encoder, one in its architecture."""
        if self.pretrained_stage1 is None:
            from fastdae.models.autoencoder import build_decoder

            return build_decoder(self.cfg.autoencoder)
        from fastdae.integrations.pretrained import build_decoder as build_pretrained_decoder

        return build_pretrained_decoder(self.cfg.stage1.encoder)

    def open_cache(self) -> Any:
        """run/cache, verified against the frozen encoder it was built from and this run's dataset."""
        from fastdae.cache import LatentCache

        cache = LatentCache(self.cache_dir, verify="lazy")
        cache.check(encoder_sha256=self.encoder_sha256(), dataset_fingerprint=self.fingerprint)
        return cache

    def frozen_bottleneck(self) -> nn.Module:
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

    # ---- identity ------------------------------------------------------------------------------
    def inputs(self, stage: str) -> dict[str, str]:
        """Fingerprints of what `stage` reads: the dataset and the upstream weights' sha256."""
        out = {"dataset": self.fingerprint}
        if stage != "stage1":
            out["encoder"] = self.encoder_sha256()
        if stage == "samples":
            final = self.final_decoder_stage
            out["decoder"] = self.sha256(self.require(self.decoder_file(final), final))
            out["dit"] = self.sha256(self.require(self.dit_file, "prior"))
        return out

    def changed_inputs(self, stage: str, rec: dict[str, Any]) -> list[str]:
        """What `stage` read (its recorded identity `rec`) that differs now; a missing input says so."""
        try:
            return differences(rec["inputs"], self.inputs(stage))
        except MissingOutputError as e:
            return [str(e)]

    def require_current(self, stage: str) -> None:
        """Before reading a finished run's `stage` outputs (fastdae.sample): refuse unless the stage
        finished and neither what it read nor the config keys it depends on changed since."""
        rec = self.recorded(stage)
        if rec is None or not self._finished(stage):
            raise MissingOutputError(
                f"{stage} has not finished in {self.root}: train it first (stages=['{stage}', ...])"
            )
        changed = self.changed_inputs(stage, rec) + differences(rec["config"], config_identity(self.cfg, stage))
        if changed:
            raise RunError(
                f"{stage} in {self.root} is stale, it was built from other inputs or config: "
                f"{'; '.join(changed)}. Train {stage} again (stages=['{stage}', ...]) first."
            )

    def recorded(self, stage: str) -> dict[str, Any] | None:
        path = self.identity_file(stage)
        if not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text())
            if isinstance(rec, dict) and isinstance(rec.get("config"), dict) and isinstance(rec.get("inputs"), dict):
                return rec
        except ValueError:
            pass
        raise RunError(f"{path} is not a stage identity (edited or corrupted); use overwrite to start the run again")

    def prepare(self) -> None:
        """Refuse a folder holding another run (or, on resume, what cannot be resumed), check the batch
        sizes against the dataset, then write config.yaml. Nothing is written before the checks pass."""
        cfg, root = self.cfg, self.root
        if root.is_dir() and any(root.iterdir()):
            if not self.config_file.is_file():
                raise RunError(
                    f"out_dir {root} is not empty and is not a fastdae run (no config.yaml); it is never "
                    f"cleared, not even with overwrite: choose another out_dir"
                )
            if cfg.overwrite:
                self._on_main(lambda: [files.remove(p) for p in root.iterdir()])
        conflicts = []
        for stage in STAGES:
            if not self.stage_dir(stage).exists():
                continue
            rec = self.recorded(stage)
            diff = (
                ["no identity.json (another run, or one of an older fastdae)"]
                if rec is None
                else differences(rec["config"], config_identity(cfg, stage))
            )
            if diff and not (rec is not None and stage in DERIVED and stage in cfg.stages):  # those are redone
                conflicts.append(f"{stage} was trained with " + "; ".join(diff))
        if conflicts:
            raise RunError(
                f"out_dir {root} holds another run: {' | '.join(conflicts)}. Use overwrite "
                f"(--overwrite) to clear it, or another out_dir."
            )
        for stage in cfg.stages if cfg.resume else ():
            self._check_resumable(stage)
        self._check_upstream_on_resume()
        self._check_batches()
        # overwrite acts once, in this call: a config.yaml that kept it would clear the run (or the
        # out_dir of anyone who reuses the file) when trained again, e.g. with --config it --resume
        self._on_main(
            lambda: (
                root.mkdir(parents=True, exist_ok=True),
                files.write_bytes(self.config_file, dataclasses.replace(cfg, overwrite=False).to_yaml().encode()),
            )
        )

    def _check_resumable(self, stage: str) -> None:
        rec = self.recorded(stage)
        if rec is None or stage not in CHECKPOINTED:
            return
        if rec["inputs"]["dataset"] != self.fingerprint:
            raise RunError(
                f"cannot resume {stage}: it was trained on another dataset (fingerprint "
                f"{rec['inputs']['dataset'][:12]}..., now {self.fingerprint[:12]}...): the images changed. "
                f"Train it again without resume, or use overwrite."
            )
        ckpt = latest_checkpoint(self.stage_dir(stage))
        key, steps = self.total_steps(stage)
        if ckpt is not None and checkpoint_step(ckpt) > steps:
            raise RunError(
                f"cannot resume {stage}: {key}={steps} is below its last checkpoint (step "
                f"{checkpoint_step(ckpt)}); raise it to >= {checkpoint_step(ckpt)}, or train the stage "
                f"again without resume"
            )

    def _check_upstream_on_resume(self) -> None:
        """Stage 2 and the prior read stage 1's encoder (through the cache): resuming them in a call that
        trains stage 1 further would continue from checkpoints of another encoder. Refused up front,
        before stage 1 spends its steps."""
        cfg = self.cfg
        if not cfg.resume or "stage1" not in cfg.stages:
            return
        rec = self.recorded("stage1")
        if rec is not None and self._finished("stage1") and rec["inputs"]["dataset"] == self.fingerprint:
            return  # stage 1 will be skipped: its encoder stays
        stale = [s for s in ("stage2", "prior") if s in cfg.stages and self.recorded(s) is not None]
        if stale:
            raise RunError(
                f"cannot resume {' and '.join(stale)} in a call that trains stage1 (again or further): "
                f"they were trained on the encoder stage1 replaces. Resume stage1 alone (stages=stage1), "
                f"then train {', '.join(s for s in cfg.stages if s != 'stage1')} again without resume"
            )

    def _check_batches(self) -> None:
        n, world = len(self.dataset), self.dist.world_size
        count = n * (2 if self.cfg.cache.flip else 1)
        for key, items in (("stage1.batch_size", n), ("stage2.batch_size", count), ("prior.batch_size", count)):
            batch = getattr(self.cfg, key.split(".")[0]).batch_size
            if batch % world:
                raise ConfigError(f"{key}={batch} must be divisible by the number of processes ({world})")
            accum = getattr(self.cfg, key.split(".")[0]).grad_accum
            if (batch // world) % accum:
                raise ConfigError(
                    f"{key}={batch} over {world} process(es) gives {batch // world} images per process, "
                    f"not divisible by {key.split('.')[0]}.grad_accum={accum} (equal micro-batches)"
                )
            if (items // world) // (batch // world) == 0:
                raise ConfigError(
                    f"{key}={batch} is more than the {items} items of the dataset"
                    f"{' with flipped copies' if items != n else ''} over {world} process(es)"
                )

    def begin(self, stage: str) -> bool:
        """Before a stage: False when it finished earlier (resume, same identity); else prepares its
        folder (continued from `resume_from[stage]`, or cleared and given its identity.json)."""
        if stage in ("stage2", "prior", "samples") and self.pretrained_stage1 is not None:
            self.pretrained_stage1.release_encoder()  # later stages read latents only: free the encoder's memory
        if stage in ("stage2", "prior"):
            self.open_cache()  # a cache of another encoder or dataset is refused before anything is touched
        inputs, rec = self.inputs(stage), self.recorded(stage)
        self.resume_from[stage] = None
        if self.cfg.resume and rec is not None:
            changed = differences(rec["inputs"], inputs) + differences(rec["config"], config_identity(self.cfg, stage))
            if not changed and self._finished(stage):
                log.info(f"{stage}: finished earlier ({self.metrics_file(stage)}), skipped")
                return False
            if not changed:
                self.resume_from[stage] = latest_checkpoint(self.stage_dir(stage))
                self._on_main(lambda: self._resumable_stage_dir(stage))
                return True
            if stage in CHECKPOINTED:
                raise RunError(
                    f"cannot resume {stage}: what it reads changed since it was trained "
                    f"({'; '.join(changed)}). Train it again without resume, or use overwrite."
                )
        keep = stage == "cache"  # LatentCache.build reuses the shards of its own identity
        self._on_main(
            lambda: self._fresh_stage_dir(stage, keep, {"config": config_identity(self.cfg, stage), "inputs": inputs})
        )
        return True

    def _finished(self, stage: str) -> bool:
        path = self.metrics_file(stage)
        if not path.is_file():
            return False
        return stage not in CHECKPOINTED or json.loads(path.read_text())["steps"] == self.total_steps(stage)[1]

    def _resumable_stage_dir(self, stage: str) -> None:
        """The stage runs again: it is no longer finished, and temp files of a killed process go."""
        self.metrics_file(stage).unlink(missing_ok=True)
        for debris in self.stage_dir(stage).glob(".*.tmp*"):
            files.remove(debris)

    def _fresh_stage_dir(self, stage: str, keep: bool, identity: dict[str, Any]) -> None:
        d = self.stage_dir(stage)
        if d.exists() and not keep:
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        self.metrics_file(stage).unlink(missing_ok=True)
        files.write_json(self.identity_file(stage), identity)

    def finish(self, stage: str, metrics: dict[str, Any]) -> None:
        self._on_main(lambda: files.write_json(self.metrics_file(stage), metrics))

    def _on_main(self, fn: Any) -> None:
        """fn() on rank 0 between barriers: every rank has read the folder before, and sees the change after."""
        self.dist.barrier()
        if self.dist.is_main:
            fn()
        self.dist.barrier()

    def summarize(self) -> Result:
        """summary.json of the stages whose outputs still match what they were built from; the others
        are listed under "stale" with what changed (e.g. stage 1 was trained again since)."""
        stages, stale = {}, {}
        for stage in STAGES:
            rec = self.recorded(stage)
            if rec is None or not self.metrics_file(stage).is_file():
                continue
            changed = self.changed_inputs(stage, rec)
            if changed:
                stale[stage] = changed
            else:
                stages[stage] = json.loads(self.metrics_file(stage).read_text())
        cfg = self.cfg
        summary = {
            "mode": cfg.mode,
            "bottleneck": cfg.autoencoder.bottleneck,
            "seed": cfg.seed,
            "stages": stages,
            "stale": stale,
            "wall_s": sum(m.get("wall_s", 0.0) for m in stages.values()),
        }
        if self.dist.is_main:
            files.write_json(self.summary_file, summary)
        weights = {
            "encoder": self.encoder_file,
            "stage1_decoder": self.decoder_file("stage1"),
            "stage2_decoder": self.decoder_file("stage2"),
            "dit": self.dit_file,
        }
        return Result(
            run_dir=self.root,
            metrics=summary,
            checkpoints={k: p for k, p in weights.items() if p.is_file()},
            cache=self.cache_dir if "cache" in stages else None,
            sample_grid=self.sample_grid if "samples" in stages else None,
            summary=self.summary_file if self.dist.is_main else None,
        )
