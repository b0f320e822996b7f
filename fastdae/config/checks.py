"""Validation: ranges, names (with "did you mean" for near misses) and the cross-field rules, run when
a config is built (`validate`), and what only the machine can tell (`check_environment`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastdae.config import schema
from fastdae.config.schema import DEVICE_PATTERN, STAGES, ConfigError, TrainConfig, check_choice, did_you_mean
from fastdae.data import CROPS, DATASETS, PROCEDURAL
from fastdae.models.autoencoder import BOTTLENECKS


# ---- validation -------------------------------------------------------------------------------
def _dit_models() -> dict[str, Any]:
    from fastdae.models.dit import DiT_models  # imported when a config is checked, not at import

    return DiT_models


def _samplers() -> tuple[str, ...]:
    from fastdae.models.diffusion import SAMPLERS

    return SAMPLERS


# dotted key -> allowed names, checked as soon as the value is read (see _build)
CHOICES: dict[str, Any] = {
    "mode": schema.MODES,
    "precision": schema.PRECISIONS,
    "autoencoder.bottleneck": BOTTLENECKS,
    "data.name": DATASETS,
    "data.crop": CROPS,
    "prior.objective": schema.OBJECTIVES,
    "prior.schedule": schema.SCHEDULES,
    "prior.time_sampling": schema.TIME_SAMPLINGS,
    "stage1.posterior": schema.POSTERIORS,
    **{f"{p}.optimizer": schema.OPTIMIZERS for p in ("stage1", "stage2", "prior")},
    **{f"{p}.lr_schedule": schema.LR_SCHEDULES for p in ("stage1", "stage2", "prior")},
}

SEED_LIMIT = 2**63  # torch and numpy generators take 64-bit seeds; larger ones overflow in the middle of a run

# (dotted key, test, what the value must be); "{ae}" expands to stage1 and stage2
_RANGES: tuple[tuple[str, Any, str], ...] = (
    *((f"{{ae}}.{k}", lambda v: v >= 1, ">= 1") for k in ("steps", "batch_size", "log_every", "ckpt_every")),
    *(
        (f"prior.{k}", lambda v: v >= 1, ">= 1")
        for k in ("steps", "batch_size", "log_every", "ckpt_every", "num_timesteps", "sample_steps", "num_samples")
    ),
    *((f"{p}.lr", lambda v: v > 0, "> 0") for p in ("{ae}", "{ae}.disc", "prior")),
    *((f"{p}.warmup_steps", lambda v: v >= 0, ">= 0") for p in ("{ae}", "prior")),
    *((f"{p}.weight_decay", lambda v: v >= 0, ">= 0") for p in ("{ae}", "prior")),
    *((f"{p}.grad_accum", lambda v: v >= 1, ">= 1 (1: no accumulation)") for p in ("{ae}", "prior")),
    *((f"{p}.grad_clip", lambda v: v >= 0, ">= 0 (0: no clipping)") for p in ("{ae}", "prior")),
    *((f"{p}.ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0: no EMA)") for p in ("{ae}", "prior")),
    *((f"{{ae}}.{k}", lambda v: v >= 0, ">= 0") for k in ("l1_weight", "chroma_weight", "lpips_weight")),
    ("{ae}.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1) (Adam's beta1, beta2)"),
    ("prior.cfg_scale", lambda v: v >= 0, ">= 0"),
    ("prior.judge_steps", lambda v: v >= 0, ">= 0 (0: samples not judged)"),
    ("prior.clip_x0", lambda v: v >= 0, ">= 0 (0: x0 not clipped)"),
    ("seed", lambda v: 0 <= v < SEED_LIMIT, "in [0, 2**63) (a 64-bit generator seed)"),
    ("data.seed", lambda v: 0 <= v < SEED_LIMIT, "in [0, 2**63) (a 64-bit generator seed)"),
    ("autoencoder.num_codes", lambda v: v >= 2, ">= 2 (a VQ codebook of one code carries no information)"),
    ("cache.batch_size", lambda v: v >= 1, ">= 1"),
    ("cache.shard_size", lambda v: v >= 1, ">= 1"),
    ("num_workers", lambda v: v >= 0, ">= 0"),
    ("threads", lambda v: v >= 0, ">= 0 (0: auto, the CPUs this process may use)"),
)


def get_key(cfg: Any, key: str) -> Any:
    """The value at a dotted key ("stage1.disc.lr")."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_finite(value: Any, key: str) -> None:
    """Every float in the config (nested or in a list) is finite: inf and NaN pass every range test
    written as a comparison of the wrong way round (nan >= 0 is False, inf > 0 is True) and surface
    as NaN losses or images mid-run, so they are refused up front, naming the key."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}" if key else k)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Every rule that needs no data, devices or files (those: `check_environment`); ConfigError names the key."""
    _check_finite(cfg.to_dict(), "")
    for key, allowed in CHOICES.items():
        check_choice(key, get_key(cfg, key), allowed)
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ConfigError(
                f"stages: unknown stage {stage!r}{did_you_mean(stage, STAGES)}; known, in run order: {list(STAGES)}"
            )
    if cfg.stages != sorted(cfg.stages, key=STAGES.index) or len(set(cfg.stages)) != len(cfg.stages):
        raise ConfigError(f"stages must be distinct and in run order {list(STAGES)}, got {cfg.stages}")
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if cfg.precision == "fp16" and cfg.device == "cpu":
        raise ConfigError(
            "precision='fp16' (fp16 autocast + GradScaler) needs a CUDA device, got device='cpu'; "
            "use 'fp32' or 'bf16' on CPU"
        )
    for pattern, ok, what in _RANGES:
        for key in [pattern.format(ae=s) for s in ("stage1", "stage2")] if "{ae}" in pattern else [pattern]:
            value = get_key(cfg, key)
            if not ok(value):
                raise ConfigError(f"{key} must be {what}, got {value!r}")
    for stage in ("stage1", "stage2", "prior"):
        s = getattr(cfg, stage)
        if s.batch_size % s.grad_accum:
            raise ConfigError(
                f"{stage}.batch_size={s.batch_size} must be divisible by {stage}.grad_accum="
                f"{s.grad_accum} (batch_size is the images per optimizer step, in grad_accum equal "
                f"micro-batches)"
            )
    p = cfg.prior
    check_choice("prior.model", p.model, _dit_models())
    check_choice("prior.sampler", p.sampler, _samplers())
    if p.objective == "flow" and p.schedule != "linear":
        raise ConfigError(f"prior.schedule must be 'linear' with prior.objective 'flow' (one path), got {p.schedule!r}")
    if p.objective == "ddpm" and p.time_sampling != "uniform":
        raise ConfigError(
            f"prior.time_sampling {p.time_sampling!r} is for prior.objective 'flow'; ddpm samples its indices uniformly"
        )
    if p.objective == "ddpm" and p.schedule == "cosine" and p.clip_x0 <= 0:
        raise ConfigError(
            "prior.schedule 'cosine' with prior.objective 'ddpm' needs prior.clip_x0 > 0 (e.g. 4): the "
            "schedule's last alpha_bar is 2e-9, and unclipped x0 estimates make the samples explode"
        )
    if cfg.cache.images and (cfg.data.crop != "center" or cfg.data.flip):
        raise ConfigError(
            f"cache.images stores one draw of each image, but data.crop={cfg.data.crop!r} / data.flip="
            f"{cfg.data.flip} draw a new one every time: use data.crop 'center' and data.flip false (cache.flip "
            f"adds the flipped copies), or cache.images false"
        )
    if p.cfg_scale != 1.0 and not p.class_cond:
        raise ConfigError(f"prior.cfg_scale={p.cfg_scale} (classifier-free guidance) needs prior.class_cond true")
    if cfg.stage1.encoder is None:
        _check_latent_grid(
            cfg,
            cfg.autoencoder.downsample,
            "the autoencoder's downsampling factor {down} (2 ** (len(autoencoder.ch_mult) - 1))",
        )
        return
    if "stage1" in cfg.stages or cfg.mode != "dae":
        raise ConfigError(
            f"stage1.encoder={cfg.stage1.encoder!r} is a pretrained stage 1: stages must not list "
            f"'stage1' and mode must be 'dae', got stages={cfg.stages}, mode={cfg.mode!r}"
        )


def _check_latent_grid(cfg: TrainConfig, down: int, what: str) -> None:
    """data.size divisible by the encoder's downsampling factor, and the latent grid by the DiT's patch."""
    if cfg.data.size % down:
        raise ConfigError(f"data.size={cfg.data.size} must be divisible by {what.format(down=down)}")
    p = cfg.prior
    patch = _dit_models()[p.model].keywords["patch_size"]
    if (cfg.data.size // down) % patch:
        raise ConfigError(
            f"data.size={cfg.data.size} gives {cfg.data.size // down}x{cfg.data.size // down} latents, "
            f"not divisible by prior.model {p.model!r}'s patch size {patch}"
        )


def check_environment(cfg: TrainConfig) -> None:
    """What validate cannot know from the config alone: the device exists, the named files exist."""
    import torch

    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device!r} but torch sees no CUDA device (use 'auto' or 'cpu')")
        index = int(cfg.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={cfg.device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "precision='fp16' (fp16 autocast + GradScaler) needs a CUDA device and torch sees none; "
            "use 'fp32' or 'bf16' on CPU"
        )
    for key, module, package in (
        ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
        ("wandb", "wandb", "wandb"),
    ):
        if getattr(cfg, key) and not _importable(module):
            raise ConfigError(
                f"{key}=true needs the {package} package, which is not installed (pip install {package}), "
                f"or set {key}=false"
            )
    if cfg.data.name not in PROCEDURAL:
        try:
            cfg.data.require_root("data.root")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    files = {"data.root": cfg.data.root if cfg.data.name not in PROCEDURAL else None}
    for stage in ("stage1", "stage2"):
        for name in ("lpips_trunk", "lpips_lin"):
            files[f"{stage}.{name}"] = get_key(cfg, f"{stage}.{name}")
    for key, path in files.items():
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}={path!r} does not exist")
    if cfg.data.name == "folder" and (cfg.data.root is None or not Path(cfg.data.root).is_dir()):
        raise ConfigError(f"data.root={cfg.data.root!r} must be a folder of images with data.name 'folder'")
    if cfg.data.name == "array" and (cfg.data.root is None or not Path(cfg.data.root).is_file()):
        raise ConfigError(f"data.root={cfg.data.root!r} must be a .npy or .npz file with data.name 'array'")
    _check_out_dir_outside_data(cfg)
    if cfg.stage1.encoder is not None:
        from fastdae.pretrained.source import latent_shape

        try:
            _, down = latent_shape(cfg.stage1.encoder)
        except (OSError, ValueError) as e:
            raise ConfigError(f"stage1.encoder: {e}") from None
        _check_latent_grid(cfg, down, "stage1.encoder's downsampling factor {down}")


def _check_out_dir_outside_data(cfg: TrainConfig) -> None:
    """A run inside its own image folder would feed its PNGs (grids, reconstructions, samples) back
    as training images, a new class, to the next run of that folder: refused."""
    if cfg.data.name != "folder" or cfg.data.root is None:
        return
    out, data = Path(cfg.out_dir).resolve(), Path(cfg.data.root).resolve()
    if out == data or out.is_relative_to(data):
        raise ConfigError(
            f"out_dir={cfg.out_dir!r} lies inside data.root={cfg.data.root!r}: the run's own PNGs would be "
            f"read as training images (a new class) by the next run on that folder; choose an out_dir outside it"
        )


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
