"""The run configuration's schema: one tree of dataclasses (TrainConfig and the stage configs it nests;
component configs live next to their component), the names each key allows, and ConfigError.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastdae.data import DataConfig
from fastdae.models.autoencoder import AutoencoderConfig, WeakDecoderConfig
from fastdae.models.diffusion import Objective, Schedule, TimeSampling
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
class OptimConfig:
    """The loop options every trained stage shares (stage 1, stage 2, the prior): a linear warm-up of
    `warmup_steps`, `optimizer` adam | adamw (`weight_decay`: Adam's L2 term, AdamW's decoupled decay),
    `lr_schedule` constant | cosine (to 0 at the last step, after the warm-up), `grad_accum`
    micro-batches per step (batch_size stays the items per optimizer step), `compile` (torch.compile
    the trained modules), `fused` (torch's fused Adam/AdamW kernel: one kernel for every parameter
    instead of a per-parameter loop; faster, but not bitwise the loop's weights, so it is part of the
    run's identity), `grad_clip` (global norm; 0: off) and `ema_decay` (0: no EMA of the weights)."""

    warmup_steps: int = 0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    grad_accum: int = 1
    compile: bool = False
    fused: bool = False
    grad_clip: float = 1.0
    ema_decay: float = 0.999


@dataclass
class AEStageConfig(OptimConfig):
    """One autoencoder training stage (stage 1, or stage 2 on cached latents); both use the losses of
    docs/paper.md §3: l1_weight * L1 + lpips_weight * LPIPS + lambda * L_G (+ bottleneck term in stage 1),
    plus chroma_weight * the L1 of the colour alone (fastdae.models.losses; 0: VQGAN's loss).

    LPIPS needs local VGG16 weights (`lpips_trunk`, `lpips_lin`; nothing is downloaded) or
    `lpips_random_init` (tests); without either it is off and the run log says so.
    Adam(lr, betas) as VQGAN; the loop options are OptimConfig's (docs/training.md: training options).
    The discriminator keeps Adam(disc.lr, betas), constant."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
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
    AutoencoderKL / VQModel folder or a taming VQGAN folder (fastdae.pretrained.source), used
    frozen. The run then starts at `cache` (stage1 must not be listed, mode must be "dae"),
    `autoencoder` and `weak_decoder` are unused, stage 2 trains a decoder of the source's
    architecture and also writes stage2/diffusers/ (a folder `from_pretrained` loads) or
    stage2/taming/ (last.ckpt + config.yaml). KL latents are the posterior mean or, with posterior
    "sample", a fresh draw per step."""

    encoder: str | None = None
    posterior: str = "mean"


@dataclass
class CacheConfig:
    """The one pass of the frozen encoder that writes run/cache (fastdae.LatentCache). `images`: also
    store the decoded, resized uint8 images in run/cache/images (fastdae.cache.images), which stage 2
    then reads in place of the image files (docs/multi-node.md)."""

    batch_size: int = 256
    shard_size: int = 4096
    flip: bool = False
    images: bool = False


@dataclass
class PriorConfig(OptimConfig):
    """DiT prior on cached latents (scaled by the cache's per-channel mean/std) and its sampler.
    The loop options are OptimConfig's (betas fixed to DiT's (0.9, 0.999)). `judge_steps`: the
    samples stage scores its samples with the judge classifier of fastdae.evaluation (trained for
    this many steps on held-out items only, kept in run/judge/): class accuracy and validity in
    summary.json; 0, or a dataset without classes, skips it. `clip_x0` > 0 clamps the sampler's x0
    estimates to [-clip_x0, clip_x0] (latents normalised to unit std; 0: off). Objective ddpm with
    schedule cosine needs it (e.g. 4): the schedule's last alpha_bar is 2e-9, and unclipped samples
    explode (results/prior-diagnosis, hypothesis 12). `time_sampling`: flow's training times, uniform or
    logit_normal (SD3; see fastdae.models.diffusion.make_diffusion)."""

    model: str = "DiT-T/2"
    objective: Objective = "flow"
    schedule: Schedule = "linear"
    time_sampling: TimeSampling = "uniform"
    num_timesteps: int = 1000
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
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
    """A whole DAE run (docs/paper.md §2, §5). `mode`: "dae" (weak decoder in stage 1, then stage 2),
    "joint" (full decoder for stage1.steps + stage2.steps, no stage 2), "control" (full decoder for
    stage1.steps, then stage 2). `stages` run in order; each reads earlier outputs from out_dir.
    `precision` "auto": bf16 autocast on CUDA, fp32 on CPU; "fp16": fp16 autocast with a GradScaler
    (CUDA only). `tensorboard`: scalars and image grids in <stage>/tb; `wandb`: the same to Weights &
    Biases (needs the wandb package; its own settings, e.g. WANDB_MODE=offline, apply). `resume`:
    continue each listed stage from its last checkpoint (finished stages are skipped) when its
    identity matches (docs/training.md: resume); `overwrite`: clear an out_dir that holds another run
    first. `threads`: torch's CPU threads, 0 = auto (OMP_NUM_THREADS if set, else the CPUs this
    process may use; fastdae/threads.py, docs/cpu.md)."""

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
    threads: int = 0
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False

    def __post_init__(self) -> None:
        from fastdae.config.checks import validate  # checks.py reads these classes: imported when used

        validate(self)

    # ---- dict / YAML round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """A config from a (possibly partial) nested dict; missing keys come from `base` (default: defaults)."""
        from fastdae.config.parse import build, merge  # parse.py builds these classes: imported when used

        return build(cls, merge((base or cls()).to_dict(), d, ""), "")

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
