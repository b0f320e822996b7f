"""The prior stage: a DiT trained on the cached latents.

Latents are the KL posterior draws or the VQ codebook vectors of the cached indices, scaled per
channel by the cache's statistics (LatentScaler), so one DiT serves both bottlenecks (docs/design.md).
Writes prior/dit.safetensors (EMA weights when enabled).
"""

from __future__ import annotations

from typing import Any

import torch

from fastdae.models.diffusion import LatentScaler, make_diffusion
from fastdae.models.dit import DiT, DiT_models
from fastdae.training import distributed
from fastdae.training.checkpoint import State, restore, save_weights
from fastdae.training.distributed import cache_batches, to_device, wrap_ddp
from fastdae.training.logs import StepLog
from fastdae.training.optim import Updater
from fastdae.training.run import Run

BETAS = (0.9, 0.999)  # DiT's AdamW betas


def build_dit(r: Run) -> DiT:
    """The configured DiT over the run's latents, (channels, size / downsample) (validated in the config)."""
    cfg = r.cfg
    return DiT_models[cfg.prior.model](
        input_size=cfg.data.size // r.downsample,
        in_channels=r.latent_channels,
        num_classes=r.num_classes(),
        learn_sigma=False,
    )


def run(r: Run) -> dict[str, Any]:
    cfg, p, device = r.cfg, r.cfg.prior, r.device
    batch = r.per_rank("prior.batch_size")
    cache, bottleneck = r.open_cache(), r.frozen_bottleneck()
    scaler = LatentScaler(cache.channel_mean, cache.channel_std).to(device)
    torch.manual_seed(cfg.seed + 2)
    model = build_dit(r).to(device)
    model_train = wrap_ddp(model, r.dist, device, p.compile)
    diffusion = make_diffusion(p.objective, p.schedule, p.num_timesteps, p.time_sampling)
    upd = Updater(model.parameters(), p, total_steps=p.steps, fp16=r.fp16, device=device, betas=BETAS)
    state = State({"dit": model}, {"dit": upd})
    state.keep_ema("dit", model, p.ema_decay)
    start = restore(r.resume_from["prior"], state, {"dit": p.lr})
    loader = cache.loader(batch, seed=cfg.seed, num_workers=max(1, cfg.num_workers), pin_memory=device.type == "cuda")
    batches = cache_batches(loader, start)
    log = StepLog(r, "prior", p.steps, start, p.log_every, p.ckpt_every, batch * r.dist.world_size)
    model.train()
    for step in range(start, p.steps):
        distributed.seed_step(cfg.seed, "prior", step, r.dist.rank)
        for fields in upd.micro_batches(to_device(log.batch(batches), device), model_train):
            with torch.no_grad():
                x0 = scaler.normalize(bottleneck.latent(fields))  # (b, C, h, w), ~unit variance per channel
            y = fields["label"] if model.num_classes > 0 else None
            with r.autocast():
                loss = diffusion.loss(model_train, x0, y)
            upd.backward(loss)
        terms = upd.logged_step()
        state.update_emas(step)
        log.step(step + 1, terms)
        r.save_if_due("prior", step + 1, p.steps, p.ckpt_every, state)
    metrics = log.finish()
    if r.dist.is_main:
        save_weights(r.dit_file, state.final("dit", model).state_dict())
    metrics["num_classes"] = model.num_classes
    return metrics
