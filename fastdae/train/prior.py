"""The prior stage: a DiT trained on the cached latents, and the samples stage that decodes its samples.

Latents are the KL posterior draws or the VQ codebook vectors of the cached indices, scaled per
channel by the cache's statistics (LatentScaler), so one DiT serves both bottlenecks. VQ samples are
snapped to their nearest code (fastdae.vq_nearest) before decoding (DESIGN.md). Writes
prior/dit.safetensors (EMA weights when enabled) and samples/grid.png + samples/images.safetensors.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastdae.data import build_dataset
from fastdae.models.autoencoder import build_decoder
from fastdae.models.diffusion import LatentScaler, make_diffusion
from fastdae.models.dit import DiT_models
from fastdae.train import loop
from fastdae.train.latents import load_frozen_bottleneck, open_cache
from fastdae.train.stage1 import DECODER_FILE

DIT_FILE = "dit.safetensors"


def num_classes(cfg: Any) -> int:
    """Classes the DiT is conditioned on (0: unconditional), from the dataset's own description."""
    if not cfg.prior.class_cond:
        return 0
    ds = build_dataset(cfg.data)
    if hasattr(ds, "num_classes"):
        return int(ds.num_classes)
    if getattr(ds, "classes", None):
        return len(ds.classes)
    return int(np.max(ds.labels)) + 1 if hasattr(ds, "labels") else 0


def build_dit(cfg: Any, channels: int) -> nn.Module:
    if cfg.prior.model not in DiT_models:
        raise ValueError(f"prior.model must be one of {sorted(DiT_models)}, got {cfg.prior.model!r}")
    size = cfg.data.size // cfg.autoencoder.downsample
    return DiT_models[cfg.prior.model](input_size=size, in_channels=channels, num_classes=num_classes(cfg),
                                       learn_sigma=False)


def run(ctx: loop.Context) -> dict[str, Any]:
    cfg, p, device = ctx.cfg, ctx.cfg.prior, ctx.device
    batch = loop.per_rank_batch(p.batch_size, ctx.dist, "prior.batch_size")
    cache = open_cache(ctx)
    bottleneck = load_frozen_bottleneck(ctx)
    scaler = LatentScaler(cache.channel_mean, cache.channel_std).to(device)
    torch.manual_seed(cfg.seed + 2)
    model = build_dit(cfg, cfg.autoencoder.z_channels).to(device)
    model_train = loop.wrap_ddp(model, ctx.dist, device)
    diffusion = make_diffusion(p.objective, p.schedule, p.num_timesteps)
    opt, sched = loop.make_optimizer(model.parameters(), p.lr, (0.9, 0.999), p.warmup_steps)
    emas = {"dit": loop.EMA(model, p.ema_decay)} if p.ema_decay > 0 else {}
    params = list(model.parameters())
    loader = cache.loader(batch, seed=cfg.seed, num_workers=max(1, cfg.num_workers), pin_memory=device.type == "cuda")

    def step(fields: dict[str, Tensor], i: int) -> dict[str, Tensor]:
        with torch.no_grad():
            x0 = scaler.normalize(bottleneck.latent(fields))  # (B, C, h, w), ~unit variance per channel
        y = fields["label"] if model.num_classes > 0 else None
        with ctx.autocast():
            loss = diffusion.loss(model_train, x0, y)
        grad_norm = loop.optimizer_step(loss, opt, sched, params, p.grad_clip)
        return {"loss": loss.detach(), "grad_norm": grad_norm}

    stage = loop.Stage("prior", p.steps, batch, p.log_every, p.ckpt_every, lambda start: loop.cache_batches(loader, start),
                       step, {"dit": model}, {"dit": opt}, {"dit": sched}, emas)
    model.train()
    metrics = loop.run_stage(ctx, stage)
    if ctx.dist.is_main:
        loop.save_weights(ctx.stage_dir("prior") / DIT_FILE, (emas["dit"].module if emas else model).state_dict())
    metrics["num_classes"] = model.num_classes
    return metrics


@torch.no_grad()
def samples(ctx: loop.Context) -> dict[str, Any]:
    """Decode prior.num_samples DiT samples (labels cycling over the classes) with the final decoder:
    stage 2's, or stage 1's in mode "joint" (which has no stage 2)."""
    cfg, p, device = ctx.cfg, ctx.cfg.prior, ctx.device
    if not ctx.dist.is_main:
        return {}
    cache = open_cache(ctx)
    bottleneck = load_frozen_bottleneck(ctx)
    scaler = LatentScaler(cache.channel_mean, cache.channel_std).to(device)
    C = cfg.autoencoder.z_channels
    model = build_dit(cfg, C)
    loop.load_weights(ctx.run_dir / "prior" / DIT_FILE, model)
    model = model.to(device).eval()
    decoder_stage = "stage1" if cfg.mode == "joint" else "stage2"
    decoder = build_decoder(cfg.autoencoder)
    loop.load_weights(ctx.run_dir / decoder_stage / DECODER_FILE, decoder)
    decoder = decoder.to(device).eval()

    t0 = time.perf_counter()
    n, h = p.num_samples, model.input_size
    y = torch.arange(n, device=device) % model.num_classes if model.num_classes > 0 else None
    generator = torch.Generator(device).manual_seed(cfg.seed)
    diffusion = make_diffusion(p.objective, p.schedule, p.num_timesteps)
    with ctx.autocast():
        z = diffusion.sample(model, (n, C, h, h), y=y, steps=p.sample_steps, sampler=p.sampler,
                             cfg_scale=p.cfg_scale, generator=generator)
    z = scaler.denormalize(z.float())
    if cfg.autoencoder.bottleneck == "vq":
        from fastdae import vq_nearest

        codebook = bottleneck.quantizer.codebook  # (K, D)
        idx, _ = vq_nearest(z.permute(0, 2, 3, 1).reshape(-1, C), codebook)  # (n*h*h,)
        z = bottleneck.latent({"indices": idx.view(n, h, h)})
    with ctx.autocast():
        images = decoder(z).float().clamp(-1, 1)  # (n, 3, H, W)
    elapsed = time.perf_counter() - t0
    out = ctx.stage_dir("samples")
    grid = loop.save_grid(images, out / "grid.png")
    loop.save_weights(out / "images.safetensors", {"images": images.cpu(), **({"labels": y.cpu()} if y is not None else {})})
    return {"num_samples": n, "decoder": f"{decoder_stage}/{DECODER_FILE}", "grid": str(grid), "time_s": elapsed,
            "samples_per_s": n / elapsed}

