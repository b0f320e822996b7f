"""Stage 2 (PAPER.md §2): a fresh full decoder trained on the frozen latents read from run/cache.

The encoder is never built or loaded: the batches are (cached fields, images) pairs, the latent is
the frozen codebook lookup (VQ) or a fresh draw from the cached posterior (KL). Same losses as stage 1
without the bottleneck term. Writes stage2/decoder.safetensors (EMA weights when enabled).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastdae.data import build_dataset
from fastdae.models.autoencoder import build_decoder
from fastdae.train import loop
from fastdae.train.latents import load_frozen_bottleneck, open_cache
from fastdae.train.stage1 import DECODER_FILE, AutoencoderUpdate


def run(ctx: loop.Context) -> dict[str, Any]:
    cfg, s, device = ctx.cfg, ctx.cfg.stage2, ctx.device
    batch = loop.per_rank_batch(s.batch_size, ctx.dist, "stage2.batch_size")
    cache = open_cache(ctx)
    bottleneck = load_frozen_bottleneck(ctx)
    dataset = build_dataset(cfg.data)
    torch.manual_seed(cfg.seed + 1)  # a fresh decoder, not stage 1's initialisation
    decoder = build_decoder(cfg.autoencoder).to(device)
    decoder_train = loop.wrap_ddp(decoder, ctx.dist, device)
    update = AutoencoderUpdate(ctx, s, "decoder", decoder)
    emas = {"decoder": loop.EMA(decoder, s.ema_decay)} if s.ema_decay > 0 else {}
    loader = cache.paired_loader(dataset, batch, seed=cfg.seed, num_workers=max(1, cfg.num_workers),
                                 pin_memory=device.type == "cuda")

    def step(b: tuple[dict[str, Tensor], Tensor], i: int) -> dict[str, Tensor]:
        fields, x = b
        with torch.no_grad():
            z = bottleneck.latent(fields)  # (B, C, h, w): frozen codebook lookup or posterior draw
        return update(x, lambda: (decoder_train(z), 0.0), i, decoder.last_layer)

    def grid(path: Any) -> dict[str, float]:
        final = emas["decoder"].module if emas else decoder.eval()

        def pairs() -> Any:
            for idx in loop.eval_chunks(len(dataset)):
                fields = loop.to_device(cache.gather(idx), device)
                with torch.no_grad(), ctx.autocast():
                    x_hat = final(bottleneck.latent(fields, sample=False))
                yield loop.images_at(dataset, idx), x_hat

        return loop.reconstruction_eval(pairs(), path)

    stage = loop.Stage("stage2", s.steps, batch, s.log_every, s.ckpt_every,
                       lambda start: loop.cache_batches(loader, start), step, update.modules, update.optimizers,
                       update.schedulers, emas, grid)
    decoder.train()
    metrics = loop.run_stage(ctx, stage)
    if ctx.dist.is_main:
        loop.save_weights(ctx.stage_dir("stage2") / DECODER_FILE, (emas["decoder"].module if emas else decoder).state_dict())
    metrics["lpips"] = update.crit.lpips is not None
    return metrics
