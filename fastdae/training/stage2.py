"""Stage 2 (docs/paper.md §2): a fresh full decoder trained on the frozen latents read from run/cache.

The encoder is never built or loaded: the batches are (cached fields, images) pairs (the images read
from run/cache/images with cache.images, else decoded from the dataset), the latent is
the frozen codebook lookup (VQ) or a fresh draw from the cached posterior (KL). Same losses as stage 1
without the bottleneck term. Writes stage2/decoder.safetensors (EMA weights when enabled).
"""

from __future__ import annotations

from typing import Any

import torch

from fastdae.cache.images import to_signed_unit
from fastdae.training import distributed
from fastdae.training.autoencoding import evaluate, images_at, losses_and_state, update_step
from fastdae.training.checkpoint import save_weights
from fastdae.training.distributed import cache_batches, to_device, wrap_ddp
from fastdae.training.encode import image_cache
from fastdae.training.logs import StepLog
from fastdae.training.run import Run


def run(r: Run) -> dict[str, Any]:
    cfg, s, device = r.cfg, r.cfg.stage2, r.device
    batch = r.per_rank("stage2.batch_size")
    cache, bottleneck = r.open_cache(), r.frozen_bottleneck()
    torch.manual_seed(cfg.seed + 1)  # a fresh decoder, not stage 1's initialisation
    decoder = r.build_decoder().to(device)  # fastdae's, or diffusers' Decoder with stage1.encoder
    decoder_train = wrap_ddp(decoder, r.dist, device, s.compile)
    crit, state, start = losses_and_state(r, s, "stage2", "decoder", decoder, decoder)
    upd = state.updaters["decoder"]
    # with cache.images the targets come decoded from run/cache/images as uint8, made floats on the device
    # (the same floats as the dataset's): no file opened, a quarter of the bytes copied
    targets: Any = r.dataset
    if cfg.cache.images:
        targets = image_cache(r, uint8=True)
        targets.verify_split()  # under torchrun each rank hashes 1/world of the shards, not all of them
    loader = cache.paired_loader(
        targets, batch, seed=cfg.seed, num_workers=max(1, cfg.num_workers), pin_memory=device.type == "cuda"
    )
    batches = cache_batches(loader, start)
    log = StepLog(r, "stage2", s.steps, start, s.log_every, s.ckpt_every, batch * r.dist.world_size)
    decoder.train()
    for step in range(start, s.steps):
        distributed.seed_step(cfg.seed, "stage2", step, r.dist.rank)
        fields, x = to_device(log.batch(batches), device)  # cached fields of x; x (B, 3, H, W)
        if x.dtype == torch.uint8:  # from the image cache
            x = to_signed_unit(x)
        for fm, xm in upd.micro_batches((fields, x), decoder_train):  # B / grad_accum items each
            with torch.no_grad():
                z = bottleneck.latent(fm)  # (b, C, h, w): frozen codebook lookup or posterior draw
            with r.autocast():
                x_hat = decoder_train(z)
                loss, terms = crit.generator_loss(xm, x_hat, 0.0, step, decoder.last_layer)
            upd.backward(loss, terms, x_hat)  # terms and x_hat kept for the log and the discriminator
        terms, x_hat = update_step(r, crit, state, "decoder", step, x)  # generator, discriminator, EMA
        log.step(step + 1, terms, images=(x, x_hat))
        r.save_if_due("stage2", step + 1, s.steps, s.ckpt_every, state)
    metrics = log.finish()

    final = state.final("decoder", decoder).eval()
    if r.dist.is_main:

        def reconstruct(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            z = bottleneck.latent(to_device(cache.gather(idx), device), sample=False)
            return images_at(r.dataset, idx), final(z)

        metrics["eval"] = evaluate(r, "stage2", reconstruct)
        save_weights(r.decoder_file("stage2"), final.state_dict())
        source = cfg.stage1.encoder
        if source is not None:  # the source encoder + this decoder, in the source's format
            from fastdae.pretrained.source import export_decoder, source_kind

            kind = source_kind(source)
            metrics[kind] = str(export_decoder(final, source, r.export_dir(kind)))
    metrics["lpips"] = crit.lpips is not None
    return metrics
