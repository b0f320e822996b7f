"""`fastdae.train(config) -> Result`: the whole DAE recipe (PAPER.md §2, §5) in one call.

    result = fastdae.train(fastdae.config.preset("default"))
    result = fastdae.train({"out_dir": "runs/x", "mode": "joint"})   # partial dict over the defaults
    result = fastdae.train("run.yaml")

The stages listed in config.stages run in order, each reading what earlier ones wrote to out_dir:
  stage1   encoder + bottleneck + (weak | full) decoder          -> stage1/encoder.safetensors, decoder
  cache    one pass of the frozen encoder                        -> cache/ (fastdae.LatentCache)
  stage2   fresh full decoder on cached latents (no encoder)     -> stage2/decoder.safetensors
  prior    DiT on the cached latents                             -> prior/dit.safetensors
  samples  DiT samples decoded by the final decoder              -> samples/grid.png
then summary.json gathers every stage's metrics.json. Under torchrun every stage runs data-parallel.
"""
from __future__ import annotations

import importlib
import logging
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdae.config import TrainConfig, check_environment, load_config
from fastdae.train import loop

log = logging.getLogger("fastdae.train")
__all__ = ["train", "Result", "TrainConfig"]


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


# stage -> (module, function); imported on first use, so a run of stage 1 alone never imports the DiT
STAGE_FUNCTIONS = {"stage1": ("stage1", "run"), "cache": ("latents", "run"), "stage2": ("stage2", "run"),
                   "prior": ("prior", "run"), "samples": ("prior", "samples")}


def _stage_function(name: str) -> Any:
    module, function = STAGE_FUNCTIONS[name]
    return getattr(importlib.import_module(f"fastdae.train.{module}"), function)


def _setup_logging(run_dir: Path, is_main: bool) -> logging.Handler | None:
    """INFO messages of fastdae.train go to run_dir/train.log and, if nothing else shows them, stderr."""
    log.setLevel(logging.INFO)
    if not is_main:
        return None
    if not log.handlers and not logging.getLogger().handlers:
        log.addHandler(logging.StreamHandler())
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    return handler


def train(config: TrainConfig | dict[str, Any] | str | Path) -> Result:
    """Run config.stages in order (see the module docstring) and return the Result."""
    cfg = load_config(config)
    check_environment(cfg)
    d, device = loop.setup_distributed(cfg.device)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    d.barrier()
    handler = _setup_logging(run_dir, d.is_main)
    try:
        if d.is_main:
            cfg.save(run_dir / "config.yaml")
        ctx = loop.Context(cfg, run_dir, device, d)
        for name in cfg.stages:
            metrics_file = run_dir / name / "metrics.json"
            if name == "stage2" and cfg.mode == "joint":
                log.info("stage2: skipped in mode 'joint' (stage 1 trained the full decoder for stage1 + stage2 steps)")
                continue
            if cfg.resume and metrics_file.is_file():
                log.info(f"{name}: finished earlier ({metrics_file}), skipped")
                continue
            log.info(f"{name}: starting ({cfg.mode} mode, {device}, {d.world_size} process(es))")
            t0 = time.perf_counter()
            metrics = _stage_function(name)(ctx)
            metrics["wall_s"] = time.perf_counter() - t0
            if d.is_main:
                ctx.stage_dir(name)
                loop.write_json(metrics_file, metrics)
            d.barrier()
            log.info(f"{name}: done in {metrics['wall_s']:.1f} s")
        return _summarize(cfg, run_dir, d.is_main)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _summarize(cfg: TrainConfig, run_dir: Path, write: bool) -> Result:
    """summary.json from every stage's metrics.json in the run directory (also of earlier calls)."""
    import json

    from fastdae.train.latents import CACHE_DIR

    stages = {}
    for name in ("stage1", "cache", "stage2", "prior", "samples"):
        path = run_dir / name / "metrics.json"
        if path.is_file():
            stages[name] = json.loads(path.read_text())
    summary = {"mode": cfg.mode, "bottleneck": cfg.autoencoder.bottleneck, "seed": cfg.seed, "stages": stages,
               "wall_s": sum(m.get("wall_s", 0.0) for m in stages.values())}
    summary_path = run_dir / "summary.json"
    if write:
        loop.write_json(summary_path, summary)
    weights = {"encoder": run_dir / "stage1" / "encoder.safetensors",
               "stage1_decoder": run_dir / "stage1" / "decoder.safetensors",
               "stage2_decoder": run_dir / "stage2" / "decoder.safetensors",
               "dit": run_dir / "prior" / "dit.safetensors"}
    grid = run_dir / "samples" / "grid.png"
    cache = run_dir / CACHE_DIR
    return Result(run_dir=run_dir, metrics=summary, checkpoints={k: p for k, p in weights.items() if p.is_file()},
                  cache=cache if (cache / "manifest.json").is_file() else None,
                  sample_grid=grid if grid.is_file() else None, summary=summary_path if write else None)


class _CallableModule(types.ModuleType):
    """`fastdae.train` names both this package and the function train(). Once any submodule
    (fastdae.train.loop, ...) is imported, Python binds the attribute fastdae.train to the package
    module, shadowing the lazily exported function; making the module callable keeps
    `fastdae.train(cfg)` working whatever was imported first."""

    def __call__(self, config: TrainConfig | dict[str, Any] | str | Path) -> Result:
        return train(config)


sys.modules[__name__].__class__ = _CallableModule
