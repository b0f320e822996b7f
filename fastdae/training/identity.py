"""What each stage's outputs depend on, so a run folder never holds something other than it says.

A stage's identity is (1) the values of the config keys it depends on and (2) fingerprints of its
inputs: the dataset fingerprint and the sha256 of the upstream weights it reads. It is written to
<stage>/identity.json before the stage writes anything else, and compared before anything is
resumed or reused:

- any recorded stage whose config keys differ means the folder holds another run: refused
  (the message names every differing key) unless `overwrite` clears the folder first;
- resuming a stage whose inputs changed (other data; stage 1 trained again since) is refused;
- keys a user may change between calls of the same run (SAFE_KEYS: learning rates, log/ckpt
  intervals, steps, compile, the cache's batch size, and the run-control keys) are not part of any
  identity. More steps on resume continue from the last checkpoint; fewer than the last checkpoint
  are refused (with lr_schedule cosine, the decay then stretches over the new number of steps).
  The other loop options (optimizer, weight_decay, lr_schedule, warmup_steps, grad_accum, precision)
  change what is trained: they are identity keys.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from fastdae.config import ConfigError, TrainConfig

# keys that say how to run, not what is trained
RUN_CONTROL = (
    "out_dir",
    "stages",
    "resume",
    "overwrite",
    "device",
    "num_workers",
    "threads",
    "progress",
    "tensorboard",
    "wandb",
)
# keys a resumed run may change (steps: see the module docstring; compile changes how, not what, is computed)
SAFE_KEYS = (*RUN_CONTROL, "*.lr", "*.log_every", "*.ckpt_every", "*.steps", "*.compile", "cache.batch_size")
SAMPLING = (
    "prior.sampler",
    "prior.sample_steps",
    "prior.cfg_scale",
    "prior.clip_x0",
    "prior.num_samples",
    "prior.judge_steps",
)

_SHARED = ("seed", "precision", "data.*", "autoencoder.*")
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "stage1": (*_SHARED, "mode", "stage1.*"),
    "cache": ("precision", "data.*", "autoencoder.*", "cache.*"),
    "stage2": (*_SHARED, "cache.flip", "stage1.posterior", "stage2.*"),
    "prior": (*_SHARED, "cache.flip", "stage1.posterior", "prior.*"),
    "samples": (*_SHARED, "mode", "cache.flip", "stage1.posterior", "prior.*"),
}


class RunError(ConfigError):
    """The run folder holds something this config must not resume, reuse or overwrite."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def config_identity(cfg: TrainConfig, stage: str) -> dict[str, Any]:
    """The config values `stage`'s outputs depend on, by dotted key."""
    patterns = STAGE_KEYS[stage] + (("weak_decoder.*",) if stage == "stage1" and cfg.mode == "dae" else ())
    own = flatten(cfg.to_dict())
    keys = [k for k in own if _matches(k, patterns) and not _matches(k, SAFE_KEYS)]
    if stage == "prior":
        keys = [k for k in keys if k not in SAMPLING]
    return {k: own[k] for k in keys}


def differences(recorded: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """'key: recorded -> current' for every key whose value differs (or exists on one side only). A key
    the record lacks is unchanged when the current value is its default: a key added since (e.g.
    stage1.chroma_weight), at the default that computes what the older code computed. `defaults`: those
    keys' defaults (None: the flattened TrainConfig's)."""
    if defaults is None:
        defaults = flatten(TrainConfig().to_dict())

    def show(d: dict[str, Any], k: str) -> str:
        return repr(d[k]) if k in d else "(absent)"

    def same(k: str) -> bool:
        if k not in recorded:
            return k in current and k in defaults and current[k] == defaults[k]
        return k in current and recorded[k] == current[k]

    return [
        f"{k}: {show(recorded, k)} -> {show(current, k)}"
        for k in sorted(recorded.keys() | current.keys())
        if not same(k)
    ]
