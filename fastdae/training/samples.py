"""The samples stage: prior.num_samples DiT samples (labels cycling over the classes), decoded by the
final decoder (stage 2's, or stage 1's in mode "joint"). VQ samples are snapped to their nearest
code (fastdae.vq_nearest) before decoding. Writes samples/grid.png and samples/images.safetensors."""
from __future__ import annotations

import time
from typing import Any

import torch

from fastdae.models.diffusion import LatentScaler, make_diffusion
from fastdae.training.checkpoint import load_weights, save_weights
from fastdae.training.logs import save_grid
from fastdae.training.prior import build_dit
from fastdae.training.run import Run


@torch.no_grad()
def run(r: Run) -> dict[str, Any]:
    cfg, p, device = r.cfg, r.cfg.prior, r.device
    if not r.dist.is_main:
        return {}
    cache, bottleneck = r.open_cache(), r.frozen_bottleneck()
    scaler = LatentScaler(cache.channel_mean, cache.channel_std).to(device)
    C = r.latent_channels
    model = build_dit(r)
    load_weights(r.dit_file, model)
    model = model.to(device).eval()
    decoder = r.build_decoder()
    load_weights(r.decoder_file(r.final_decoder_stage), decoder)
    decoder = decoder.to(device).eval()

    t0 = time.perf_counter()
    n, h = p.num_samples, model.input_size
    y = torch.arange(n, device=device) % model.num_classes if model.num_classes > 0 else None
    generator = torch.Generator(device).manual_seed(cfg.seed)
    diffusion = make_diffusion(p.objective, p.schedule, p.num_timesteps)
    with r.autocast():
        z = diffusion.sample(model, (n, C, h, h), y=y, steps=p.sample_steps, sampler=p.sampler,
                             cfg_scale=p.cfg_scale, generator=generator)
    z = scaler.denormalize(z.float())
    if r.bottleneck_kind == "vq":
        from fastdae import vq_nearest

        codebook = bottleneck.quantizer.codebook  # (K, D)
        idx, _ = vq_nearest(z.permute(0, 2, 3, 1).reshape(-1, C), codebook)  # (n*h*h,)
        z = bottleneck.latent({"indices": idx.view(n, h, h)})
    with r.autocast():
        images = decoder(z).float().clamp(-1, 1)  # (n, 3, H, W)
    elapsed = time.perf_counter() - t0
    grid = save_grid(images, r.sample_grid)
    save_weights(r.sample_images, {"images": images.cpu(), **({"labels": y.cpu()} if y is not None else {})})
    decoder_file = r.decoder_file(r.final_decoder_stage).relative_to(r.root)
    return {"num_samples": n, "decoder": str(decoder_file), "grid": str(grid),
            "time_s": elapsed, "samples_per_s": n / elapsed}
