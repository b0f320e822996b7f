"""`fastdae.train(config) -> Result`: the whole DAE recipe (docs/paper.md §2, §5) in one call.

    result = fastdae.train(fastdae.config.preset("default"))
    result = fastdae.train({"out_dir": "runs/x", "mode": "joint"})   # partial dict over the defaults
    result = fastdae.train("run.yaml")

The stages listed in config.stages run in order, each reading what earlier ones wrote to out_dir:
  stage1   encoder + bottleneck + (weak | full) decoder          -> stage1/encoder.safetensors, decoder  (stage1.py)
  cache    one pass of the frozen encoder                        -> cache/ (fastdae.LatentCache)        (encode.py)
  stage2   fresh full decoder on cached latents (no encoder)     -> stage2/decoder.safetensors           (stage2.py)
  prior    DiT on the cached latents                             -> prior/dit.safetensors                (prior.py)
  samples  DiT samples decoded by the final decoder              -> samples/grid.png                     (samples.py)
then summary.json gathers every stage's metrics.json and curves.png draws every stage's losses.
`Run` (run.py) owns the folder and checks each stage's identity before anything is resumed or
reused (identity.py). Under torchrun every stage runs data-parallel.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastdae.config import TrainConfig, check_environment, load_config
from fastdae.training.logs import write_curves
from fastdae.training.run import Result, Run, log

__all__ = ["train", "Result", "TrainConfig", "Run"]

# stage -> module with run(r: Run) -> metrics; imported on first use (a stage-1 run never imports the DiT)
STAGE_MODULES = {"stage1": "stage1", "cache": "encode", "stage2": "stage2", "prior": "prior", "samples": "samples"}


def train(config: TrainConfig | dict[str, Any] | str | Path) -> Result:
    """Run config.stages in order (see the module docstring) and return the Result."""
    cfg = load_config(config)
    check_environment(cfg)
    r = Run(cfg)
    r.prepare()  # every refusal happens here, before anything is trained or written
    with _log_to(r), _wandb_run(r):
        for name in cfg.stages:
            if name == "stage2" and cfg.mode == "joint":
                log.info("stage2: skipped in mode 'joint' (stage 1 trained the full decoder for stage1 + stage2 steps)")
                continue
            if not r.begin(name):
                continue
            log.info(f"{name}: starting ({cfg.mode} mode, {r.device}, {r.dist.world_size} process(es))")
            t0 = time.perf_counter()
            metrics = importlib.import_module(f"fastdae.training.{STAGE_MODULES[name]}").run(r)
            metrics["wall_s"] = time.perf_counter() - t0
            r.finish(name, metrics)
            log.info(f"{name}: done in {metrics['wall_s']:.1f} s")
        write_curves(r)
        return r.summarize()


@contextlib.contextmanager
def _wandb_run(r: Run) -> Iterator[None]:
    """With wandb=true, one W&B run (project "fastdae", named after out_dir, files under out_dir) on
    rank 0 for this call; the stages log to it (logs.Trackers). W&B's own settings (WANDB_MODE,
    WANDB_PROJECT, ...) apply."""
    if not (r.cfg.wandb and r.dist.is_main):
        yield
        return
    wandb = importlib.import_module("wandb")
    run = wandb.init(project="fastdae", name=r.root.name, dir=str(r.root), config=r.cfg.to_dict())
    try:
        yield
    finally:
        run.finish()


@contextlib.contextmanager
def _log_to(r: Run) -> Iterator[None]:
    """INFO messages of the trainer go to run/train.log and, if nothing else shows them, stderr."""
    log.setLevel(logging.INFO)
    if not r.dist.is_main:
        yield
        return
    if not log.handlers and not logging.getLogger().handlers:
        log.addHandler(logging.StreamHandler())
    handler = logging.FileHandler(r.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
