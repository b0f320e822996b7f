"""`Run`: one run folder in progress. The layout is `RunFolder`'s (paths.py), the shared resources
`RunResources`' (resources.py); this module owns the identity lifecycle (fastdae.training.identity):
`prepare()` before anything is trained or written, `begin(stage)` before each stage, `finish` after
it, `summarize()` at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdae import files
from fastdae.config import STAGES, ConfigError
from fastdae.training.checkpoint import State, checkpoint_step, latest_checkpoint, save_checkpoint
from fastdae.training.distributed import SAME_DATA
from fastdae.training.identity import RunError, config_identity, differences
from fastdae.training.paths import RUN_MARKER, MissingOutputError, is_run_entry
from fastdae.training.resources import RunResources

log = logging.getLogger("fastdae.train")
CHECKPOINTED = ("stage1", "stage2", "prior")  # stages that resume from checkpoints
DERIVED = ("cache", "samples")  # pure functions of their inputs and keys: redone, never resumed
MARKER_TEXT = b"a fastdae run folder: fastdae train may clear what it wrote here (docs/safety.md)\n"


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


class Run(RunResources):
    """A run in progress: RunResources plus the identity checks (see the module docstring)."""

    # ---- identity ------------------------------------------------------------------------------
    def inputs(self, stage: str) -> dict[str, str]:
        """Fingerprints of what `stage` reads: the dataset and the upstream weights' sha256."""
        out = {"dataset": self.fingerprint}
        if stage != "stage1":
            out["encoder"] = self.encoder_sha256()
        if stage == "samples":
            final = self.final_decoder_stage
            out["decoder"] = self.verified_sha256(self.decoder_file(final), final)
            out["dit"] = self.verified_sha256(self.dit_file, "prior")
        return out

    def verify_weights(self, stage: str) -> None:
        """Every weight file `stage` recorded (finish) still has its recorded sha256 (verified_sha256)."""
        recorded = self._metrics(stage).get("weights", {})
        for name in recorded if isinstance(recorded, dict) else ():
            self.verified_sha256(self.stage_dir(stage) / name, stage)

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
        self.verify_weights(stage)
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
        rec = files.read_json_object(path)
        if rec is not None and isinstance(rec.get("config"), dict) and isinstance(rec.get("inputs"), dict):
            return rec
        raise RunError(f"{path} is not a stage identity (edited or corrupted); use overwrite to start the run again")

    def prepare(self) -> None:
        """Refuse a folder holding another run (or, on resume, what cannot be resumed), check the batch
        sizes against the dataset, then write config.yaml. Nothing is written before the checks pass."""
        cfg, root = self.cfg, self.root
        self.dist.agree("dataset fingerprint", self.fingerprint, SAME_DATA)  # before any rank may refuse alone
        if self._check_folder() and cfg.overwrite:
            # only fastdae's own entries are left (_check_folder): the marker stays, the run is cleared
            def clear() -> None:
                for p in root.iterdir():
                    if p.name != RUN_MARKER:
                        files.remove(p)

            self._on_main(clear)
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
        def write_run_files() -> None:
            root.mkdir(parents=True, exist_ok=True)
            if not self.marker_file.is_file():
                files.write_bytes(self.marker_file, MARKER_TEXT)
            files.write_bytes(self.config_file, dataclasses.replace(cfg, overwrite=False).to_yaml().encode())

        self._on_main(write_run_files)

    def _check_folder(self) -> bool:
        """True when out_dir holds a run of fastdae (its marker) that this call may use; an empty or
        absent folder is False (prepare makes it, with the marker). Refused: a file; a non-empty folder
        without the marker (not even overwrite clears it); with overwrite, a run folder holding
        anything fastdae did not write there (RUN_ENTRIES), each such entry named."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise RunError(f"out_dir {root} is a file, not a folder: choose another out_dir")
        try:
            entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        except OSError as e:
            raise RunError(f"out_dir {root} cannot be listed: {e.strerror or e}") from None
        if not entries:
            return False
        if RUN_MARKER not in entries:
            raise RunError(
                f"out_dir {root} is not empty and is not a fastdae run (no {RUN_MARKER}, the marker fastdae "
                f"writes when it makes a run folder); it is never written to or cleared, not even with "
                f"overwrite: choose another out_dir. A run of an older fastdae has no marker: create the "
                f"empty file {self.marker_file} to adopt it"
            )
        foreign = [name for name in entries if not is_run_entry(name)]
        if self.cfg.overwrite and foreign:
            shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
            raise RunError(
                f"out_dir {root} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} fastdae did not "
                f"write: {shown}; overwrite removes only a run's own files: move them out of {root} or "
                f"choose another out_dir"
            )
        return True

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
        self.stage = stage
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
        if not self.metrics_file(stage).is_file():
            return False
        return stage not in CHECKPOINTED or self._metrics(stage).get("steps") == self.total_steps(stage)[1]

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
        """metrics.json of a finished stage, with the sha256 of each weight file it wrote (verified_sha256)."""

        def write() -> None:
            weights = {p.name: self.sha256(p) for p in sorted(self.stage_dir(stage).glob("*.safetensors"))}
            files.write_json(self.metrics_file(stage), {**metrics, "weights": weights})

        self._on_main(write)

    def save_if_due(self, stage: str, done: int, steps: int, every: int, state: State) -> None:
        """Rank 0 checkpoints `stage` after `done` of its `steps` steps: every `every` steps and at the end."""
        if (done % every == 0 or done == steps) and self.dist.is_main:
            save_checkpoint(self.stage_dir(stage), done, state)

    def _on_main(self, fn: Callable[[], object]) -> None:
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
                stages[stage] = self._metrics(stage)
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
