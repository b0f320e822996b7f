"""The cache step: one pass of the frozen stage-1 encoder over the dataset -> run/cache (fastdae.LatentCache),
and with cache.images the decoded images -> run/cache/images (fastdae.cache.images) for stage 2, built
first: the encoder then reads its images from there, so each image file is decoded once, and the latents
are the dataset's, bit for bit (the stored images read back as the same floats).

A complete cache of the same encoder file (sha256), dataset fingerprint, flip and shard size is
reused as is; an interrupted build keeps its finished shards (LatentCache.build). The image cache
follows the same rules with the dataset fingerprint alone (no encoder made it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from torch import Tensor

from fastdae.cache import CacheError, LatentCache
from fastdae.cache.images import FOLDER, ImageCache, build_images
from fastdae.models.autoencoder import build_encoder
from fastdae.training.checkpoint import load_weights
from fastdae.training.run import Run

if TYPE_CHECKING:
    from fastdae.cache.format import IndexSpace
    from fastdae.data import MapDataset


def run(r: Run) -> dict[str, Any]:
    if not r.cfg.cache.images:
        return latents(r, r.dataset)
    cached, stored = images(r)
    return {**latents(r, cached), "images": stored}


def image_cache(r: Run, uint8: bool = False) -> ImageCache:
    """run/cache/images, checked against this run's dataset (stage 2 reads it with cache.images)."""
    return ImageCache(
        r.cache_dir / FOLDER,
        dataset_fingerprint=r.fingerprint,
        flip=r.cfg.cache.flip,
        image_size=r.dataset.image_size,  # (H, W)
        uint8=uint8,
    )


def images(r: Run) -> tuple[ImageCache, dict[str, Any]]:
    """The decoded-image cache, opened, and its metrics: reused when complete and of this dataset, else
    built (resuming its shards)."""
    cfg = r.cfg
    try:
        cached = image_cache(r)
        return cached, {"reused": True, "count": cached.n}
    except CacheError:
        pass
    t0 = time.perf_counter()
    build_images(
        r.cache_dir / FOLDER,
        r.dataset,
        dataset_fingerprint=r.fingerprint,
        batch_size=cfg.cache.batch_size,
        shard_size=cfg.cache.shard_size,
        num_workers=cfg.num_workers,
        progress=cfg.progress and r.dist.is_main,
    )
    elapsed = time.perf_counter() - t0
    cached = image_cache(r)
    return cached, {"reused": False, "count": cached.n, "time_s": elapsed, "images_per_s": cached.n / elapsed}


def latents(r: Run, source: MapDataset | IndexSpace) -> dict[str, Any]:
    """The latent cache: reused when complete and of this encoder and dataset, else encoded from
    `source`, the dataset or its image cache (resuming its shards)."""
    cfg, device = r.cfg, r.device
    sha = r.encoder_sha256()
    try:  # flip and shard_size are part of the stage's identity (checked by Run.prepare)
        cache = r.open_cache()
        return {"reused": True, "count": len(cache), "fields": sorted(cache.fields)}
    except CacheError:
        pass
    if r.pretrained_stage1 is not None:  # stage1.encoder: a diffusers AutoencoderKL / VQModel, frozen
        encoder = r.pretrained_stage1.encoder
    else:
        encoder = build_encoder(cfg.autoencoder)
        load_weights(r.require(r.encoder_file, "stage1"), encoder, prefix="encoder.")
        encoder = encoder.to(device).eval().requires_grad_(False)
    bottleneck = r.frozen_bottleneck()

    def encode(images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        with r.autocast():
            h = encoder(images.to(device, non_blocking=True))
        fields, latent = bottleneck.encode_fields(h.float())  # the bottleneck in fp32: exact code choice
        return {k: v.cpu() for k, v in fields.items()}, latent.cpu()

    t0 = time.perf_counter()
    cache = LatentCache.build(
        r.cache_dir,
        source,
        encode,
        batch_size=cfg.cache.batch_size,
        shard_size=cfg.cache.shard_size,
        encoder_sha256=sha,
        dataset_fingerprint=r.fingerprint,
        flip=cfg.cache.flip,
        num_workers=cfg.num_workers,
        progress=cfg.progress and r.dist.is_main,
    )
    elapsed = time.perf_counter() - t0
    return {
        "reused": False,
        "count": len(cache),
        "fields": sorted(cache.fields),
        "time_s": elapsed,
        "latents_per_s": len(cache) / elapsed,
    }
