"""The run configuration: one tree of dataclasses, round-tripping through dicts and YAML.

    cfg = preset("default")                                   # named configs (the README's main job)
    cfg = apply_overrides(cfg, ["stage2.steps=2000", "autoencoder.bottleneck=kl"])   # typed, dotted
    cfg = load_config("run.yaml")                             # or a dict, or a TrainConfig
    cfg.save("run/config.yaml"); TrainConfig.from_dict(cfg.to_dict()) == cfg

Component configs live next to their component (DataConfig in data.py, AutoencoderConfig in
models/autoencoder.py, DiscriminatorConfig in models/discriminator.py); this module nests them.
Overrides are parsed to the field's declared type (no eval/exec); unknown keys are errors.
Every value is validated when the config is built (`validate`): ranges, names (with "did you mean"
for near misses) and the cross-field rules (image size vs the autoencoder's downsampling and the
DiT's patch size). A `ConfigError` names the dotted key, what it must be and what it got.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from fastdae.data import CROPS, DATASETS, DataConfig
from fastdae.models.autoencoder import BOTTLENECKS, AutoencoderConfig, WeakDecoderConfig
from fastdae.models.discriminator import DiscriminatorConfig

MODES = ("dae", "joint", "control")
STAGES = ("stage1", "cache", "stage2", "prior", "samples")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
OBJECTIVES = ("ddpm", "flow")
SCHEDULES = ("linear", "cosine")
TIME_SAMPLINGS = ("uniform", "logit_normal")
POSTERIORS = ("mean", "sample")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class ConfigError(ValueError):
    """A config that cannot run: the message names the dotted key, what it must be and what it got."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type (a TypeError too, for callers that catch that)."""


def did_you_mean(value: Any, allowed: Any) -> str:
    """'; did you mean 'x'?' for the closest of `allowed` (difflib), or ''."""
    near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


def check_choice(key: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {sorted(allowed)}, got {value!r}{did_you_mean(value, allowed)}")


@dataclass
class AEStageConfig:
    """One autoencoder training stage (stage 1, or stage 2 on cached latents); both use the losses of
    PAPER.md §3: l1_weight * L1 + lpips_weight * LPIPS + lambda * L_G (+ bottleneck term in stage 1),
    plus chroma_weight * the L1 of the colour alone (fastdae.models.losses; 0: VQGAN's loss).

    LPIPS needs local VGG16 weights (`lpips_trunk`, `lpips_lin`; nothing is downloaded) or
    `lpips_random_init` (tests); without either it is off and the run log says so.
    `ema_decay` 0 disables the decoder EMA. Adam(lr, betas) as VQGAN, linear warm-up of `warmup_steps`.
    Loop options (README: training options): `optimizer` adam | adamw (`weight_decay`: Adam's L2 term,
    AdamW's decoupled decay), `lr_schedule` constant | cosine (to 0 at the last step, after the warm-up),
    `grad_accum` micro-batches per step (batch_size stays the images per optimizer step), `compile`
    (torch.compile the trained modules), `fused` (torch's fused Adam/AdamW kernel: one kernel for every
    parameter instead of a per-parameter loop; faster, but not bitwise the loop's weights, so it is
    part of the run's identity). The discriminator keeps Adam(disc.lr, betas), constant."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    warmup_steps: int = 0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    grad_accum: int = 1
    compile: bool = False
    fused: bool = False
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    l1_weight: float = 1.0
    chroma_weight: float = 0.0
    lpips_weight: float = 1.0
    lpips_trunk: str | None = None
    lpips_lin: str | None = None
    lpips_random_init: bool = False
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    log_every: int = 50
    ckpt_every: int = 500


@dataclass
class Stage1Config(AEStageConfig):
    """Stage 1 as AEStageConfig, or a pretrained encoder instead: `encoder` names a local diffusers
    AutoencoderKL / VQModel folder or a taming VQGAN folder (fastdae.integrations.pretrained), used
    frozen. The run then starts at `cache` (stage1 must not be listed, mode must be "dae"),
    `autoencoder` and `weak_decoder` are unused, stage 2 trains a decoder of the source's
    architecture and also writes stage2/diffusers/ (a folder `from_pretrained` loads) or
    stage2/taming/ (last.ckpt + config.yaml). KL latents are the posterior mean or, with posterior
    "sample", a fresh draw per step."""

    encoder: str | None = None
    posterior: str = "mean"


@dataclass
class CacheConfig:
    """The one pass of the frozen encoder that writes run/cache (fastdae.LatentCache)."""

    batch_size: int = 256
    shard_size: int = 4096
    flip: bool = False


@dataclass
class PriorConfig:
    """DiT prior on cached latents (scaled by the cache's per-channel mean/std) and its sampler.
    The loop options are AEStageConfig's (betas fixed to DiT's (0.9, 0.999)). `judge_steps`: the
    samples stage scores its samples with the judge classifier of fastdae.evaluation (trained for
    this many steps on held-out items only, kept in run/judge/): class accuracy and validity in
    summary.json; 0, or a dataset without classes, skips it. `clip_x0` > 0 clamps the sampler's x0
    estimates to [-clip_x0, clip_x0] (latents normalised to unit std; 0: off). Objective ddpm with
    schedule cosine needs it (e.g. 4): the schedule's last alpha_bar is 2e-9, and unclipped samples
    explode (results/prior-diagnosis, hypothesis 12). `time_sampling`: flow's training times, uniform or
    logit_normal (SD3; see fastdae.models.diffusion.make_diffusion)."""

    model: str = "DiT-T/2"
    objective: str = "flow"
    schedule: str = "linear"
    time_sampling: str = "uniform"
    num_timesteps: int = 1000
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    warmup_steps: int = 0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    grad_accum: int = 1
    compile: bool = False
    fused: bool = False
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    class_cond: bool = True
    sampler: str = "euler"
    sample_steps: int = 50
    cfg_scale: float = 1.0
    clip_x0: float = 0.0
    num_samples: int = 64
    judge_steps: int = 600
    log_every: int = 50
    ckpt_every: int = 1000


@dataclass
class TrainConfig:
    """A whole DAE run (PAPER.md §2, §5). `mode`: "dae" (weak decoder in stage 1, then stage 2),
    "joint" (full decoder for stage1.steps + stage2.steps, no stage 2), "control" (full decoder for
    stage1.steps, then stage 2). `stages` run in order; each reads earlier outputs from out_dir.
    `precision` "auto": bf16 autocast on CUDA, fp32 on CPU; "fp16": fp16 autocast with a GradScaler
    (CUDA only). `tensorboard`: scalars and image grids in <stage>/tb; `wandb`: the same to Weights &
    Biases (needs the wandb package; its own settings, e.g. WANDB_MODE=offline, apply). `resume`: continue each listed stage from
    its last checkpoint (finished stages are skipped) when its identity matches (README: resume);
    `overwrite`: clear an out_dir that holds another run first."""

    out_dir: str = "runs/default"
    seed: int = 0
    mode: str = "dae"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    weak_decoder: WeakDecoderConfig = field(default_factory=WeakDecoderConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    cache: CacheConfig = field(default_factory=CacheConfig)
    stage2: AEStageConfig = field(default_factory=AEStageConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    precision: str = "auto"
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    num_workers: int = 0
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False

    def __post_init__(self) -> None:
        validate(self)

    # ---- dict / YAML round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """A config from a (possibly partial) nested dict; missing keys come from `base` (default: defaults)."""
        return _build(cls, _merge((base or cls()).to_dict(), d, ""), "")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | os.PathLike, base: TrainConfig | None = None) -> TrainConfig:
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(d).__name__}")
        try:
            return cls.from_dict(d, base)
        except ConfigError as e:
            raise type(e)(f"{path}: {e}") from None


def _merge(base: dict[str, Any], d: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for k, v in d.items():
        if k not in base:
            raise ConfigError(f"unknown config key {where + k!r}{did_you_mean(k, base)}; known here: {sorted(base)}")
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
                raise ConfigTypeError(f"config key {where + name!r} must be a mapping, got {type(value).__name__}")
            value = _build(tp, value, f"{where}{name}.")
        else:
            value = coerce(value, tp, where + name)
            if where + name in CHOICES:  # before the component's own check, to suggest the near miss
                check_choice(where + name, value, CHOICES[where + name])
        kwargs[name] = value
    if cls is TrainConfig:
        return cls(**kwargs)
    try:  # a component's own __post_init__ check, named by its key
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where.rstrip('.')}: {e}") from None


def coerce(value: Any, tp: Any, key: str, from_text: bool = True) -> Any:
    """Check (and convert where lossless: ints for float fields and, with from_text, strings from the
    command line) a value against a field type: bool, int, float, str, list[T], T | None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, from_text)
    if origin is list:
        if isinstance(value, str) and from_text:
            # "a,b", "[a, b]" and JSON '["a", "b"]' all read as [a, b]
            value = [v.strip().strip("'\"") for v in value.strip().strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(f"config key {key!r} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]", from_text) for i, v in enumerate(value)]
    if isinstance(value, str) and from_text:
        value = value.strip()
        if tp is bool:
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"config key {key!r} expects a bool (true/false), got {value!r}")
        if tp in (int, float):
            try:
                return tp(value)
            except ValueError:
                raise ConfigError(f"config key {key!r} expects {tp.__name__}, got {value!r}") from None
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigTypeError(f"config key {key!r} expects {tp.__name__}, got {type(value).__name__} {value!r}")
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
                raise ConfigError(f"override {key!r} conflicts with an earlier override of {p!r}")
        node[leaf] = value
    return TrainConfig.from_dict(nested, base=cfg)


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    return key.strip(), value


# ---- validation -------------------------------------------------------------------------------
def _dit_models() -> dict[str, Any]:
    from fastdae.models.dit import DiT_models  # imported when a config is checked, not at import

    return DiT_models


def _samplers() -> tuple[str, ...]:
    from fastdae.models.diffusion import SAMPLERS

    return SAMPLERS


# dotted key -> allowed names, checked as soon as the value is read (see _build)
CHOICES: dict[str, Any] = {
    "mode": MODES,
    "precision": PRECISIONS,
    "autoencoder.bottleneck": BOTTLENECKS,
    "data.name": DATASETS,
    "data.crop": CROPS,
    "prior.objective": OBJECTIVES,
    "prior.schedule": SCHEDULES,
    "prior.time_sampling": TIME_SAMPLINGS,
    "stage1.posterior": POSTERIORS,
    **{f"{p}.optimizer": OPTIMIZERS for p in ("stage1", "stage2", "prior")},
    **{f"{p}.lr_schedule": LR_SCHEDULES for p in ("stage1", "stage2", "prior")},
}

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
    ("cache.batch_size", lambda v: v >= 1, ">= 1"),
    ("cache.shard_size", lambda v: v >= 1, ">= 1"),
    ("num_workers", lambda v: v >= 0, ">= 0"),
)


def get_key(cfg: Any, key: str) -> Any:
    """The value at a dotted key ("stage1.disc.lr")."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Every rule that needs no data, devices or files (those: `check_environment`); ConfigError names the key."""
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
    files = {"data.root": cfg.data.root if cfg.data.name != "shapes" else None}
    for stage in ("stage1", "stage2"):
        for name in ("lpips_trunk", "lpips_lin"):
            files[f"{stage}.{name}"] = get_key(cfg, f"{stage}.{name}")
    for key, path in files.items():
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}={path!r} does not exist")
    if cfg.stage1.encoder is not None:
        from fastdae.integrations.pretrained import latent_shape

        try:
            _, down = latent_shape(cfg.stage1.encoder)
        except (OSError, ValueError) as e:
            raise ConfigError(f"stage1.encoder: {e}") from None
        _check_latent_grid(cfg, down, "stage1.encoder's downsampling factor {down}")


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# ---- presets ----------------------------------------------------------------------------------
def _vq() -> TrainConfig:
    """The default preset until 2026-12-02, at which the studies in results/ ran: 32x32 procedural
    shapes, VQ-128 f=4, VQGAN's loss; its reconstructions and samples are grey (results/prior-diagnosis,
    third pass). The whole recipe in a few CPU minutes (sizes and steps measured on a 2-core machine)."""
    # GAN off: at this budget it raised stage 1's L1 at step 400 (0.18 -> 0.21) and made each step 1.5-3.5x slower
    # (results/prior-diagnosis); set weight 0.8 to turn it on for longer runs
    disc = dict(ndf=16, n_layers=2, start=200, weight=0.0)
    return TrainConfig.from_dict(
        {
            "out_dir": "runs/vq",
            "data": {"name": "shapes", "size": 32, "num_samples": 4096},
            "autoencoder": {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4, "num_codes": 128},
            "weak_decoder": {"width_mult": 0.5, "num_res_blocks": 1, "dropout": 0.3},  # README: the ablation
            "stage1": {"steps": 400, "batch_size": 16, "lr": 2e-3, "disc": disc, "log_every": 50, "ckpt_every": 200},
            "stage2": {"steps": 400, "batch_size": 16, "lr": 2e-3, "disc": disc, "log_every": 50, "ckpt_every": 200},
            "cache": {"batch_size": 256, "shard_size": 2048},
            # lr 2e-3 x 4000 steps and guidance 6: at 3e-4 x 500 steps, cfg 1 the DiT had not begun to use the
            # label (samples at chance class accuracy); validity of 512 samples of one run after 3000 / 4000 / 5000
            # steps: 0.76 / 0.82 / 0.90 (results/prior-diagnosis). 256 samples: the judged rates have a standard error
            # of about 0.025 (0.05 with 64). The judge's classifier: 300 steps (~10 s). Logit-normal training
            # times instead of uniform ones: validity 0.805 -> 0.863 (seed 0), 0.785 -> 0.883 (seed 1), 0.914 -> 0.934
            # (seed 2) at 4000 steps, FD-feat 10.6 -> 5.1 on average; at 3000 logit-normal steps validity 0.84-0.87
            # on four runs, and the whole job fits 3 minutes again (results/prior-diagnosis, fifth pass)
            "prior": {
                "model": "DiT-T/2",
                "time_sampling": "logit_normal",
                "steps": 3000,
                "batch_size": 32,
                "lr": 2e-3,
                "warmup_steps": 100,
                "cfg_scale": 6.0,
                "sample_steps": 25,
                "num_samples": 256,
                "judge_steps": 300,
                "log_every": 50,
                "ckpt_every": 1000,
            },
        }
    )


def _default() -> TrainConfig:
    """The README's main job: the `vq` recipe with a KL bottleneck, a linear path from latent to pixels and
    the colour term, so that reconstructions and samples keep colour (results/prior-diagnosis, sixth pass)."""
    # VQ + linear path + chroma_weight 0.5 kept the colour but drew samples at validity 0.67 (3000 prior steps):
    # coloured shapes are combinations of codes a flow must hit exactly; KL latents are continuous (PAPER.md
    # 2: a DiT on continuous latents) and reached validity 0.79-0.87 on four runs. The prior then takes batch 64
    # for 1700 steps at lr 3e-3 (sqrt-scaled), the same time as 32 x 3000: validity 0.789 -> 0.828 on one
    # autoencoder's latents. Fused Adam: 0.6 ms instead of 2.2 ms an update
    return TrainConfig.from_dict(
        {
            "out_dir": "runs/default",
            "autoencoder": {"bottleneck": "kl", "linear_skip": True},
            "stage1": {"chroma_weight": 0.5},
            "stage2": {"chroma_weight": 0.5},
            "prior": {"batch_size": 64, "steps": 1700, "lr": 3e-3, "fused": True},
        },
        base=_vq(),
    )


def _tiny() -> TrainConfig:
    """Seconds on a CPU: for tests."""
    disc = dict(ndf=8, n_layers=1, start=1)
    return TrainConfig.from_dict(
        {
            "out_dir": "runs/tiny",
            "data": {"name": "shapes", "size": 16, "num_samples": 64},
            "autoencoder": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 4, "num_codes": 16},
            "weak_decoder": {"width_mult": 0.5, "num_res_blocks": 1, "dropout": 0.1},
            "stage1": {"steps": 3, "batch_size": 8, "disc": disc, "log_every": 1, "ckpt_every": 2},
            "stage2": {"steps": 3, "batch_size": 8, "disc": disc, "log_every": 1, "ckpt_every": 2},
            "cache": {"batch_size": 32, "shard_size": 32},
            "prior": {
                "model": "DiT-T/2",
                "steps": 3,
                "batch_size": 8,
                "sample_steps": 2,
                "num_samples": 4,
                "judge_steps": 0,
                "log_every": 1,
                "ckpt_every": 2,
            },
            "progress": False,
        }
    )


PRESETS = {"default": _default, "vq": _vq, "tiny": _tiny}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


def load_config(config: TrainConfig | dict[str, Any] | str | os.PathLike) -> TrainConfig:
    """A TrainConfig from itself, a (partial) dict over the defaults, or a YAML file path."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return TrainConfig.load(config)
    raise ConfigTypeError(f"config must be a TrainConfig, dict or YAML path, got {type(config).__name__}")
