"""The cache step: one pass of the frozen stage-1 encoder over the dataset -> run/cache (fastdae.LatentCache).

Also the readers the later stages share: the cache (checked against the encoder file's sha256 and
the dataset fingerprint) and the frozen bottleneck (the VQ codebook; the KL bottleneck has no
weights). Neither builds nor loads the encoder.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastdae.cache import CacheError, LatentCache
from fastdae.data import build_dataset, dataset_fingerprint
from fastdae.models.autoencoder import build_bottleneck, build_encoder
from fastdae.train import loop
from fastdae.train.stage1 import ENCODER_FILE

CACHE_DIR = "cache"


def encoder_file(ctx: loop.Context) -> Path:
    path = ctx.run_dir / "stage1" / ENCODER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run stage1 first (stages=['stage1', ...]) in {ctx.run_dir}")
    return path


def load_frozen_bottleneck(ctx: loop.Context) -> torch.nn.Module:
    """The stage-1 bottleneck (VQ codebook) from stage1/encoder.safetensors, frozen, in eval mode."""
    bottleneck = build_bottleneck(ctx.cfg.autoencoder)
    loop.load_weights(encoder_file(ctx), bottleneck, prefix="bottleneck.")
    return bottleneck.to(ctx.device).eval().requires_grad_(False)


def open_cache(ctx: loop.Context) -> LatentCache:
    """run/cache, verified against the stage-1 encoder file it was built from."""
    cache = LatentCache(ctx.run_dir / CACHE_DIR, verify="lazy")
    cache.check(encoder_sha256=loop.sha256_file(encoder_file(ctx)))
    return cache


def run(ctx: loop.Context) -> dict[str, Any]:
    cfg, device = ctx.cfg, ctx.device
    path = encoder_file(ctx)
    sha = loop.sha256_file(path)
    dataset = build_dataset(cfg.data)
    fingerprint = dataset_fingerprint(dataset)
    root = ctx.run_dir / CACHE_DIR
    try:  # a complete cache of this encoder and dataset is reused as is
        cache = LatentCache(root)
        cache.check(encoder_sha256=sha, dataset_fingerprint=fingerprint)
        return {"reused": True, "count": len(cache), "fields": sorted(cache.fields)}
    except CacheError:
        pass
    encoder = build_encoder(cfg.autoencoder)
    loop.load_weights(path, encoder, prefix="encoder.")
    encoder = encoder.to(device).eval().requires_grad_(False)
    bottleneck = load_frozen_bottleneck(ctx)

    def encode(images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        with ctx.autocast():
            h = encoder(images.to(device, non_blocking=True))
        fields, latent = bottleneck.encode_fields(h.float())  # the bottleneck in fp32: exact code choice
        return {k: v.cpu() for k, v in fields.items()}, latent.cpu()

    t0 = time.perf_counter()
    cache = LatentCache.build(root, dataset, encode, batch_size=cfg.cache.batch_size, shard_size=cfg.cache.shard_size,
                              encoder_sha256=sha, dataset_fingerprint=fingerprint, flip=cfg.cache.flip,
                              num_workers=cfg.num_workers, progress=cfg.progress and ctx.dist.is_main)
    elapsed = time.perf_counter() - t0
    return {"reused": False, "count": len(cache), "fields": sorted(cache.fields), "time_s": elapsed,
            "latents_per_s": len(cache) / elapsed}
