"""`RunFolder`: the layout of a run folder. Every artefact path is a property here, nowhere else; what
evaluation reads of a finished run it reads through this class too.

    run/config.yaml  summary.json  train.log  curves.png  notices.json
    run/<stage>/identity.json  metrics.json  log.csv  ckpt-*/  latest     (stage1, stage2, prior)
    run/stage1/encoder.safetensors  decoder.safetensors   run/stage2/decoder.safetensors
    run/cache/ (fastdae.LatentCache)   run/prior/dit.safetensors   run/samples/grid.png  images.safetensors
    run/judge/ (the classifier that scores the samples, prior.judge_steps)
    run/.fastdae-run   the run marker: written when fastdae makes the folder (see `RUN_ENTRIES`)

`overwrite` clears a folder only when it carries the marker and holds nothing but RUN_ENTRIES (and
fastdae's temp files): a user's own files are never deleted.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastdae.config import TrainConfig
from fastdae.training.identity import RunError

CONFIG_FILE = "config.yaml"
RUN_MARKER = ".fastdae-run"  # written by fastdae when it makes (or adopts an empty) run folder
# every top-level entry fastdae writes into a run folder: what `overwrite` may remove, and nothing else
RUN_ENTRIES = frozenset(
    {
        RUN_MARKER,
        CONFIG_FILE,
        "summary.json",
        "train.log",
        "curves.png",  # training.logs.draw_curves
        "notices.json",  # training.logs.notice_once
        "stage1",
        "cache",
        "stage2",
        "prior",
        "samples",
        "judge",  # measure.judge, prior.judge_steps
        "wandb",  # wandb=true logs under the run folder
        "eval.json",  # fastdae.evaluation's studies
    }
)
# atomic writes of fastdae.files: `.<name>.tmp<pid>` next to the file they replace
TEMP_ENTRY = re.compile(r"\.(.+)\.tmp\d+")


def is_run_entry(name: str) -> bool:
    """Whether a top-level name in a run folder is one fastdae writes (or the temp file of one)."""
    temp = TEMP_ENTRY.fullmatch(name)
    return name in RUN_ENTRIES or (temp is not None and temp.group(1) in RUN_ENTRIES)


class MissingOutputError(RunError, FileNotFoundError):
    """A stage needs what an earlier stage writes, and it is not there."""


class RunFolder:
    """The layout of a run folder: every artefact path (what evaluation reads too), nothing else."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.root = cfg, Path(cfg.out_dir)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    config_file = property(lambda self: self.root / CONFIG_FILE)
    marker_file = property(lambda self: self.root / RUN_MARKER)
    summary_file = property(lambda self: self.root / "summary.json")
    log_file = property(lambda self: self.root / "train.log")
    curves_file = property(lambda self: self.root / "curves.png")
    notices_file = property(lambda self: self.root / "notices.json")
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
