"""`plan`: what a run config costs on GPUs, per stage, estimated from the real models without running them.

    report = plan(preset("imagenet256-kl"), gpu="h100", gpus=8, images=1_281_167, mfu=0.4)
    print(table(report)); json.dumps(report.to_dict())

For each stage (stage1, cache, stage2, prior) one training step of the stage's own code (the models
and AutoencoderLoss / Diffusion.loss the trainer builds) runs on the meta device (shapes only, no
memory, no arithmetic) under torch.utils.flop_counter.FlopCounterMode, at batch 1 and batch 2:
- FLOPs per image: the difference of the two counts (matmuls, convolutions and attention; forward +
  backward; the cache forward only). Stage 1 and 2 are counted with and without the GAN terms
  (discriminator on [x; x_hat], its own step, the adaptive weight's gradients), which start at
  disc.start. LPIPS is counted whenever lpips_weight > 0 (the recipe's loss; a run needs local VGG16
  weights, lpips_trunk, to turn it on).
- activation memory per image: the bytes autograd saves for the backward (saved_tensors_hooks), the
  difference of the two batches, in fp32; halved under bf16 autocast (the GPU default, "auto").
- static memory per GPU: fp32 weights, gradients, Adam's two moments and the EMA copy of what the stage
  trains (and its discriminator), DDP's gradient buckets (one more gradient copy, > 1 GPU), the bf16
  weight copies autocast makes, and the frozen modules (LPIPS' VGG16, the cache's encoder).
- the largest batch per GPU: (HEADROOM x GPU memory - static) / activation bytes per image. The
  headroom (10 %) stands for the allocator's fragmentation and the backward's transient buffers,
  which the saved-tensor count does not see: an estimate, not a measurement.
- wall time: the stage's FLOPs (steps x global batch x FLOPs per image; the cache: every training
  image once, twice with cache.flip) / (GPUs x the GPU's published dense bf16 peak x `mfu`). Data
  loading, evaluation and checkpoints are not in it. Every time is an estimate.
The latent cache's size on disk: the fields the bottleneck stores per image in the cache's dtypes
(float16 for KL's mean and logvar, the smallest integer type for VQ indices and labels).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fastdae.config import TrainConfig
from fastdae.data import PROCEDURAL, build_dataset
from fastdae.models.autoencoder import Autoencoder, build_bottleneck, build_decoder, build_encoder
from fastdae.models.diffusion import make_diffusion
from fastdae.models.dit import DiT_models
from fastdae.models.losses import AutoencoderLoss


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # published dense bf16 tensor-core peak, FLOP/s
    memory_bytes: float


# published dense (not sparse) bf16 peaks and memory of the SXM parts
GPUS = {
    "h100": GPU("NVIDIA H100 SXM", 989e12, 80e9),
    "h200": GPU("NVIDIA H200 SXM", 989e12, 141e9),
    "a100": GPU("NVIDIA A100 SXM", 312e12, 80e9),
}
HEADROOM = 0.9  # share of GPU memory the plan fills (module docstring)
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's train split: the default for folder datasets
IMAGENET_CLASSES = 1000
ADAM_BYTES = 8  # two fp32 moments per parameter
STEP_STAGES = ("stage1", "stage2", "prior")


@dataclass
class Count:
    """One stage step counted on the meta device: FLOPs and saved-activation bytes, per image and fixed."""

    flops_per_image: float
    activation_bytes_per_image: float


@dataclass
class StagePlan:
    stage: str
    trained_params: int
    frozen_params: int
    flops_per_image: float  # the step with the GAN on (stage 1/2 past disc.start), else the only step
    flops_per_image_no_gan: float | None
    images: int  # images through the stage (steps x global batch; the cache: dataset x copies)
    total_flops: float
    activation_bytes_per_image: float  # at the run's precision on the GPU
    static_bytes: float
    max_batch_per_gpu: int
    batch_per_gpu: float
    fits: bool
    estimated_hours: float
    cache_bytes: float | None = None


@dataclass
class Plan:
    config: str
    mode: str
    gpu: str
    gpus: int
    peak_flops: float
    memory_bytes: float
    mfu: float
    images: int
    precision: str
    stages: list[StagePlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def estimated_hours(self) -> float:
        return sum(s.estimated_hours for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "estimated_hours": self.estimated_hours, "times": "estimated"}


# ---- counting on the meta device ---------------------------------------------------------------
class _SavedBytes:
    """A saved_tensors_hooks pack hook that adds up the bytes autograd keeps for the backward."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, t: Tensor) -> Tensor:
        self.total += t.numel() * t.element_size()
        return t


def count(step: Callable[[int], None], device: torch.device | str = "meta") -> Count:
    """FLOPs and saved-activation bytes per image of step(batch), from batch 1 and batch 2 (the
    difference cancels what does not grow with the batch: weights saved for the backward, biases)."""
    flops, saved = [], []
    for batch in (1, 2):
        bytes_saved = _SavedBytes()
        with FlopCounterMode(display=False) as fc, torch.autograd.graph.saved_tensors_hooks(bytes_saved, lambda t: t):
            step(batch)
        flops.append(fc.get_total_flops())
        saved.append(bytes_saved.total)
    return Count(flops[1] - flops[0], saved[1] - saved[0])


def _params(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def _counted_loss_config(s: Any) -> Any:
    """The stage's loss settings with LPIPS built from random weights when the recipe uses it (the
    cost of a trained trunk; nothing is read from disk)."""
    s = copy.deepcopy(s)
    s.lpips_trunk, s.lpips_lin = None, None
    s.lpips_random_init = s.lpips_weight > 0
    return s


@dataclass
class StageModels:
    """What one stage trains and holds frozen, and its step at a batch size on `device`."""

    trained: list[nn.Module]
    frozen: list[nn.Module]
    ema: bool
    step: Callable[[int, bool], None]  # step(batch, gan)


def _ae_step(cfg: TrainConfig, stage: str, device: torch.device) -> StageModels:
    """Stage 1 (encoder + bottleneck + the weak or full decoder) or stage 2 (a full decoder on latents)."""
    ae_cfg, s = cfg.autoencoder, getattr(cfg, stage)
    with torch.device(device):
        if stage == "stage1":
            weak = cfg.weak_decoder if cfg.mode == "dae" else None
            model: nn.Module = Autoencoder(ae_cfg, build_decoder(ae_cfg, weak))
            decoder = model.decoder
        else:
            model = decoder = build_decoder(ae_cfg)
        crit = AutoencoderLoss(_counted_loss_config(s), device)
    h = cfg.data.size // ae_cfg.downsample

    def step(batch: int, gan: bool) -> None:
        x = torch.rand(batch, 3, cfg.data.size, cfg.data.size, device=device) * 2 - 1
        if stage == "stage1":
            x_hat, aux = model(x)
        else:
            x_hat, aux = model(torch.randn(batch, ae_cfg.z_channels, h, h, device=device)), 0.0
        loss, _ = crit.generator_loss(x, x_hat, aux, s.disc.start if gan else -1, decoder.last_layer)
        loss.backward()
        if gan and crit.discriminator is not None:
            crit.discriminator_loss(x, x_hat.detach()).backward()

    return StageModels(
        [model, crit.discriminator] if crit.discriminator else [model], [crit.lpips], s.ema_decay > 0, step
    )


def _cache_step(cfg: TrainConfig, device: torch.device) -> StageModels:
    with torch.device(device):
        encoder, bottleneck = build_encoder(cfg.autoencoder).eval(), build_bottleneck(cfg.autoencoder).eval()

    def step(batch: int, gan: bool) -> None:
        # forward only (the FLOPs); the input asks for gradients so that autograd keeps every activation:
        # the saved bytes bound the forward's working memory from above (the cache runs under no_grad)
        x = torch.rand(batch, 3, cfg.data.size, cfg.data.size, device=device, requires_grad=True)
        bottleneck.encode_fields(encoder(x))

    return StageModels([], [encoder, bottleneck], False, step)


def num_classes(cfg: TrainConfig) -> int:
    """Classes the prior is conditioned on: the procedural dataset's, ImageNet's for a folder."""
    if not cfg.prior.class_cond:
        return 0
    return int(build_dataset(cfg.data).num_classes) if cfg.data.name in PROCEDURAL else IMAGENET_CLASSES


def _prior_step(cfg: TrainConfig, device: torch.device) -> StageModels:
    p, ae = cfg.prior, cfg.autoencoder
    h, classes = cfg.data.size // ae.downsample, num_classes(cfg)
    with torch.device(device):
        dit = DiT_models[p.model](input_size=h, in_channels=ae.z_channels, num_classes=classes, learn_sigma=False)
    diffusion = make_diffusion(p.objective, p.schedule, p.num_timesteps, p.time_sampling)

    def step(batch: int, gan: bool) -> None:
        x0 = torch.randn(batch, ae.z_channels, h, h, device=device)
        y = torch.zeros(batch, dtype=torch.long, device=device) if classes else None
        diffusion.loss(dit, x0, y).backward()

    return StageModels([dit], [], p.ema_decay > 0, step)


def stage_models(cfg: TrainConfig, stage: str, device: torch.device | str = "meta") -> StageModels:
    """The models and step of `stage` as the trainer builds them, on `device` (meta: shapes only)."""
    device = torch.device(device)
    if stage in ("stage1", "stage2"):
        return _ae_step(cfg, stage, device)
    if stage == "cache":
        return _cache_step(cfg, device)
    if stage == "prior":
        return _prior_step(cfg, device)
    raise ValueError(f"stage must be one of stage1, cache, stage2, prior, got {stage!r}")


# ---- the plan ----------------------------------------------------------------------------------
def cache_bytes_per_image(cfg: TrainConfig, classes: int) -> int:
    """Bytes one cached item takes on disk: KL mean + logvar in float16, or VQ indices in the smallest
    integer type, plus its label."""
    ae = cfg.autoencoder
    h = cfg.data.size // ae.downsample
    if ae.bottleneck == "kl":
        latent = 2 * ae.z_channels * h * h * 2
    else:
        latent = h * h * _int_bytes(ae.num_codes - 1)
    return latent + _int_bytes(max(classes - 1, 0))


def _int_bytes(hi: int) -> int:
    return 1 if hi < 256 else 2 if hi < 65536 else 4


def _stage_steps(cfg: TrainConfig, stage: str) -> tuple[int, int]:
    """(total steps, steps with the GAN on) of a trained stage; joint trains stage 1 for both budgets."""
    s = getattr(cfg, stage)
    steps = s.steps + (cfg.stage2.steps if stage == "stage1" and cfg.mode == "joint" else 0)
    gan = max(0, steps - s.disc.start) if stage != "prior" and s.disc.weight > 0 else 0
    return steps, gan


def plan_stage(cfg: TrainConfig, stage: str, gpu: GPU, gpus: int, mfu: float, train_images: int) -> StagePlan:
    models = stage_models(cfg, stage)
    gan_on = stage in ("stage1", "stage2") and getattr(cfg, stage).disc.weight > 0
    with_gan = count(lambda b: models.step(b, True))
    no_gan = count(lambda b: models.step(b, False)) if gan_on else None
    trained, frozen = _params(*models.trained), _params(*models.frozen)
    if stage == "cache":
        images = train_images * (2 if cfg.cache.flip else 1)
        total, batch = images * with_gan.flops_per_image, cfg.cache.batch_size
    else:
        steps, gan_steps = _stage_steps(cfg, stage)
        batch = getattr(cfg, stage).batch_size
        images = steps * batch
        plain = (no_gan or with_gan).flops_per_image
        total = batch * (gan_steps * with_gan.flops_per_image + (steps - gan_steps) * plain)
    bf16 = cfg.precision in ("auto", "bf16", "fp16")  # on a GPU every one of these autocasts
    act = with_gan.activation_bytes_per_image * (0.5 if bf16 else 1.0)
    static = trained * (4 + 4 + ADAM_BYTES + (4 if models.ema else 0) + (4 if gpus > 1 else 0) + (2 if bf16 else 0))
    static += frozen * (4 + (2 if bf16 else 0))
    max_batch = max(0, math.floor((HEADROOM * gpu.memory_bytes - static) / act)) if act > 0 else 0
    per_gpu = batch / gpus
    classes = num_classes(cfg)
    return StagePlan(
        stage=stage,
        trained_params=trained,
        frozen_params=frozen,
        flops_per_image=with_gan.flops_per_image,
        flops_per_image_no_gan=no_gan.flops_per_image if no_gan else None,
        images=images,
        total_flops=total,
        activation_bytes_per_image=act,
        static_bytes=static,
        max_batch_per_gpu=max_batch,
        batch_per_gpu=per_gpu,
        fits=per_gpu <= max_batch,
        estimated_hours=total / (gpus * gpu.peak_flops * mfu) / 3600,
        cache_bytes=images * cache_bytes_per_image(cfg, classes) if stage == "cache" else None,
    )


def stages_of(cfg: TrainConfig) -> list[str]:
    """The stages a run of `cfg` trains, in order (joint has no stage 2)."""
    return [s for s in ("stage1", "cache", "stage2", "prior") if not (s == "stage2" and cfg.mode == "joint")]


def plan(
    cfg: TrainConfig,
    gpu: str = "h100",
    gpus: int = 8,
    images: int | None = None,
    mfu: float = 0.4,
    name: str = "config",
) -> Plan:
    """The Plan of `cfg` (module docstring). images: the dataset's size (default: num_samples of a
    procedural dataset, ImageNet-1k's train split for a folder); its held-out part is not trained on."""
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    if gpus < 1 or not 0 < mfu <= 1:
        raise ValueError(f"gpus must be >= 1 and mfu in (0, 1], got gpus={gpus}, mfu={mfu}")
    if images is None:
        images = cfg.data.num_samples if cfg.data.name in PROCEDURAL else IMAGENET_TRAIN
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    held_out = 0 if cfg.data.name in PROCEDURAL else cfg.data.holdout_count(images)  # procedural: generated past
    g = GPUS[gpu]
    out = Plan(name, cfg.mode, g.name, gpus, g.peak_flops, g.memory_bytes, mfu, images, cfg.precision)
    out.stages = [plan_stage(cfg, s, g, gpus, mfu, images - held_out) for s in stages_of(cfg)]
    for s in ("stage1", "stage2"):
        c = getattr(cfg, s)
        if c.lpips_weight > 0 and c.lpips_trunk is None and not c.lpips_random_init:
            out.notes.append(
                f"{s}: LPIPS is counted (lpips_weight {c.lpips_weight:g}, the recipe's loss), but {s}.lpips_trunk is "
                "not set: a run without local VGG16 weights trains without it"
            )
    return out


def table(p: Plan) -> str:
    """The plan as a fixed-width text table, every time labelled estimated."""
    head = (
        f"plan for {p.config} (mode {p.mode}) on {p.gpus} x {p.gpu} ({p.peak_flops / 1e12:.0f} TFLOP/s dense bf16, "
        f"{p.memory_bytes / 1e9:.0f} GB each), MFU {p.mfu:.2f}, {p.images:,} images, precision {p.precision}"
    )
    cols = ("stage", "params", "GFLOP/img", "act MiB/img", "static GiB", "max batch/GPU", "batch/GPU", "cache", "hours")
    rows = []
    for s in p.stages:
        gflop = f"{s.flops_per_image / 1e9:,.1f}"
        if s.flops_per_image_no_gan is not None:
            gflop = f"{s.flops_per_image_no_gan / 1e9:,.1f}/{gflop}"
        rows.append(
            (
                s.stage,
                f"{s.trained_params / 1e6:,.1f}M" if s.trained_params else f"({s.frozen_params / 1e6:,.1f}M frozen)",
                gflop,
                f"{s.activation_bytes_per_image / 2**20:,.1f}",
                f"{s.static_bytes / 2**30:,.2f}",
                f"{s.max_batch_per_gpu:,}",
                f"{s.batch_per_gpu:g}" + ("" if s.fits else " (does not fit)"),
                f"{s.cache_bytes / 2**30:,.1f} GiB" if s.cache_bytes is not None else "",
                f"{s.estimated_hours:,.1f}",
            )
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    notes = (
        "GFLOP/img: forward + backward of one training step per image (cache: forward), without/with the GAN terms; "
        "act: saved activations per image; static: weights, gradients, Adam, EMA, frozen modules per GPU.\n"
        f"total: {p.estimated_hours:,.1f} hours, estimated (FLOPs / (GPUs x peak x MFU); data loading, evaluation "
        "and checkpoints not included)."
    )
    return "\n".join([head, "", line(cols), *(line(r) for r in rows), "", notes, *p.notes])
