"""The run configuration: one tree of dataclasses, round-tripping through dicts and YAML.

    cfg = preset("default")                                   # named configs (the README's main job)
    cfg = apply_overrides(cfg, ["stage2.steps=2000", "autoencoder.bottleneck=kl"])   # typed, dotted
    cfg = load_config("run.yaml")                             # or a dict, or a TrainConfig
    cfg.save("run/config.yaml"); TrainConfig.from_dict(cfg.to_dict()) == cfg

Component configs live next to their component (DataConfig in data.py, AutoencoderConfig in
models/autoencoder.py, DiscriminatorConfig in models/discriminator.py); this module nests them.
Overrides are parsed to the field's declared type (no eval/exec); unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from fastdae.data import DataConfig
from fastdae.models.autoencoder import AutoencoderConfig, WeakDecoderConfig
from fastdae.models.discriminator import DiscriminatorConfig

MODES = ("dae", "joint", "control")
STAGES = ("stage1", "cache", "stage2", "prior", "samples")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class AEStageConfig:
    """One autoencoder training stage (stage 1, or stage 2 on cached latents); both use the losses of
    PAPER.md §3: l1_weight * L1 + lpips_weight * LPIPS + lambda * L_G (+ bottleneck term in stage 1).

    LPIPS needs local VGG16 weights (`lpips_trunk`, `lpips_lin`; nothing is downloaded) or
    `lpips_random_init` (tests); without either it is off and the run log says so.
    `ema_decay` 0 disables the decoder EMA. Adam(lr, betas) as VQGAN, linear warm-up of `warmup_steps`."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_trunk: str | None = None
    lpips_lin: str | None = None
    lpips_random_init: bool = False
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    log_every: int = 50
    ckpt_every: int = 500


@dataclass
class CacheConfig:
    """The one pass of the frozen encoder that writes run/cache (fastdae.LatentCache)."""

    batch_size: int = 256
    shard_size: int = 4096
    flip: bool = False


@dataclass
class PriorConfig:
    """DiT prior on cached latents (scaled by the cache's per-channel mean/std) and its sampler."""

    model: str = "DiT-T/2"
    objective: str = "flow"
    schedule: str = "linear"
    num_timesteps: int = 1000
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    class_cond: bool = True
    sampler: str = "euler"
    sample_steps: int = 50
    cfg_scale: float = 1.0
    num_samples: int = 64
    log_every: int = 50
    ckpt_every: int = 1000


@dataclass
class TrainConfig:
    """A whole DAE run (PAPER.md §2, §5). `mode`: "dae" (weak decoder in stage 1, then stage 2),
    "joint" (full decoder for stage1.steps + stage2.steps, no stage 2), "control" (full decoder for
    stage1.steps, then stage 2). `stages` run in order; each reads earlier outputs from out_dir.
    `precision` "auto": bf16 autocast on CUDA, fp32 on CPU. `resume`: continue from the last checkpoint
    of each stage and skip finished stages."""

    out_dir: str = "runs/default"
    seed: int = 0
    mode: str = "dae"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    weak_decoder: WeakDecoderConfig = field(default_factory=WeakDecoderConfig)
    stage1: AEStageConfig = field(default_factory=AEStageConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    stage2: AEStageConfig = field(default_factory=AEStageConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    precision: str = "auto"
    device: str = "auto"
    resume: bool = False
    num_workers: int = 0
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"TrainConfig.mode must be one of {MODES}, got {self.mode!r}")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"TrainConfig.stages: unknown stage(s) {unknown}; known, in run order: {list(STAGES)}")
        if self.stages != sorted(self.stages, key=STAGES.index) or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"TrainConfig.stages must be distinct and in run order {list(STAGES)}, got {self.stages}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")

    # ---- dict / YAML round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """A config from a (possibly partial) nested dict; missing keys come from `base` (default: defaults)."""
        return _build(cls, _merge((base or cls()).to_dict(), d, ""), "")

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike, base: TrainConfig | None = None) -> TrainConfig:
        d = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a config file must hold a mapping, got {type(d).__name__}")
        return cls.from_dict(d, base)


def _merge(base: dict[str, Any], d: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for k, v in d.items():
        if k not in base:
            raise ValueError(f"unknown config key {where + k!r}; known here: {sorted(base)}")
        out[k] = _merge(base[k], v, f"{where}{k}.") if isinstance(base[k], dict) and isinstance(v, dict) else v
    return out


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    kwargs = {}
    for name, tp in typing.get_type_hints(cls).items():
        if name not in d:
            continue
        value = d[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise TypeError(f"config key {where + name!r} must be a mapping, got {type(value).__name__}")
            value = _build(tp, value, f"{where}{name}.")
        else:
            value = _coerce(value, tp, where + name)
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and convert where lossless: YAML ints for float fields, strings from the command line)
    a value against a field type: bool, int, float, str, list[T], T | None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            # "a,b", "[a, b]" and JSON '["a", "b"]' all read as [a, b]
            value = [v.strip().strip("'\"") for v in value.strip().strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        value = value.strip()
        if tp is bool:
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"config key {key!r} expects a bool (true/false), got {value!r}")
        if tp in (int, float):
            try:
                return tp(value)
            except ValueError:
                raise ValueError(f"config key {key!r} expects {tp.__name__}, got {value!r}") from None
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise TypeError(f"config key {key!r} expects {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict[str, Any]) -> TrainConfig:
    """Dotted overrides ("stage2.steps=2000" or {"stage2.steps": "2000"}) parsed to each field's type."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    nested: dict[str, Any] = {}
    for key, value in items:
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r} conflicts with an earlier override of {p!r}")
        node[leaf] = value
    return TrainConfig.from_dict(nested, base=cfg)


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    return key.strip(), value


# ---- presets ----------------------------------------------------------------------------------
def _default() -> TrainConfig:
    """The README's main job: 32x32 procedural shapes, VQ f=4, the whole recipe in a few CPU minutes
    (sizes and steps chosen by measuring a 2-core machine; see README)."""
    # GAN off: at this budget it raised stage 1's L1 at step 400 (0.18 -> 0.21) and made each step 1.5-3.5x slower
    # (results/prior-diagnosis); set weight 0.8 to turn it on for longer runs
    disc = dict(ndf=16, n_layers=2, start=200, weight=0.0)
    return TrainConfig.from_dict({
        "out_dir": "runs/default",
        "data": {"name": "shapes", "size": 32, "num_samples": 4096},
        "autoencoder": {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4, "num_codes": 128},
        "weak_decoder": {"width_mult": 0.5, "num_res_blocks": 1, "dropout": 0.3},  # README: the ablation
        "stage1": {"steps": 400, "batch_size": 16, "lr": 2e-3, "disc": disc, "log_every": 50, "ckpt_every": 200},
        "stage2": {"steps": 400, "batch_size": 16, "lr": 2e-3, "disc": disc, "log_every": 50, "ckpt_every": 200},
        "cache": {"batch_size": 256, "shard_size": 2048},
        # lr 2e-3 x 3000 steps and guidance 6: at 3e-4 x 500 steps, cfg 1 the DiT had not begun to use the
        # label (samples at chance class accuracy); results/prior-diagnosis
        "prior": {"model": "DiT-T/2", "steps": 3000, "batch_size": 32, "lr": 2e-3, "warmup_steps": 100,
                  "cfg_scale": 6.0, "sample_steps": 25, "num_samples": 64, "log_every": 50, "ckpt_every": 1000},
    })


def _tiny() -> TrainConfig:
    """Seconds on a CPU: for tests."""
    disc = dict(ndf=8, n_layers=1, start=1)
    return TrainConfig.from_dict({
        "out_dir": "runs/tiny",
        "data": {"name": "shapes", "size": 16, "num_samples": 64},
        "autoencoder": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 4, "num_codes": 16},
        "weak_decoder": {"width_mult": 0.5, "num_res_blocks": 1, "dropout": 0.1},
        "stage1": {"steps": 3, "batch_size": 8, "disc": disc, "log_every": 1, "ckpt_every": 2},
        "stage2": {"steps": 3, "batch_size": 8, "disc": disc, "log_every": 1, "ckpt_every": 2},
        "cache": {"batch_size": 32, "shard_size": 32},
        "prior": {"model": "DiT-T/2", "steps": 3, "batch_size": 8, "sample_steps": 2, "num_samples": 4,
                  "log_every": 1, "ckpt_every": 2},
        "progress": False,
    })


PRESETS = {"default": _default, "tiny": _tiny}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


def load_config(config: TrainConfig | dict[str, Any] | str | os.PathLike) -> TrainConfig:
    """A TrainConfig from itself, a (partial) dict over the defaults, or a YAML file path."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return TrainConfig.load(config)
    raise TypeError(f"config must be a TrainConfig, dict or YAML path, got {type(config).__name__}")
