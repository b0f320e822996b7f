"""The decoded-image cache: stage 2's target images, decoded, resized and cropped once, stored as uint8.

    build_images(run / "cache" / "images", dataset, dataset_fingerprint=fp)     # once, beside the latent cache
    images = ImageCache(root, dataset_fingerprint=fp, flip=False, image_size=(256, 256))
    LatentCache.build(run / "cache", images, encode, ...)  # the latents, from the same decoded images
    cache.paired_loader(images, 64)        # stage 2: latents and images, no image file opened

Stage 2 never runs the encoder, but without this it decodes and resizes every target image at every
step: at 256 px that is the loader's whole cost (benchmarks/results/loader-2026-12-06.md). The cache
stage builds this first and encodes the latents from it, so each image file is decoded once in all
(the same floats, so the same latents, bit for bit).

Format: a latent cache folder (fastdae.cache.format) whose one field is "image", uint8 (3, H, W),
written by fastdae.cache.writer.build under the identity encoder_sha256 = IMAGE_ENCODER. So the
latent cache's rules hold as they are: a sha256 per shard, checked before a shard's data is first
read; the dataset fingerprint (a folder's covers every file and the size, resize and crop settings);
each rank writes its own shards and rank 0 the manifest; a resumed build keeps the complete shards.

Flips: only the n dataset images are stored. With cache.flip the latent cache's items n..2n-1 are the
flipped copies; ImageCache serves that index space by flipping item i - n on read, so the image cache
is the same file whether cache.flip is on or off.

The images must be 8-bit (every value k / 127.5 - 1, as ImageFolder, the procedural shapes and uint8
arrays give them): the build refuses any other, since storing them would change stage 2's targets.
Read back, they are bit for bit what the dataset returns. A dataset whose items are random (a random
crop or flip) would be frozen at one draw: the config refuses cache.images for those
(fastdae.config.checks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fastdae import files
from fastdae.cache.format import LABEL, CacheError, IndexSpace
from fastdae.cache.reader import LatentCache

if TYPE_CHECKING:
    from fastdae.data import MapDataset

IMAGE_FIELD = "image"
IMAGE_ENCODER = "fastdae-uint8-images/1"  # the manifest's encoder_sha256: what was stored, in place of an encoder
FOLDER = "images"  # under the latent cache's folder


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> uint8, exact for 8-bit images (see to_signed_unit)."""
    return torch.round((images.float() + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)


def to_signed_unit(images: Tensor) -> Tensor:
    """uint8 -> float32 in [-1, 1] with the operations of fastdae.data's loaders (x / 127.5 - 1): the same
    floats, bit for bit, as the dataset returns for the image that was stored."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def _encode(images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    pixels = to_uint8(images)
    if not torch.equal(to_signed_unit(pixels), images.float()):
        raise ValueError(
            "cache.images stores 8-bit images, but the dataset returns values that are not k / 127.5 - 1 "
            "(float images): storing them would change stage 2's targets; turn cache.images off"
        )
    # the manifest's channel statistics: of the pixels in [-1, 1] (informative only; nothing scales by them)
    return {IMAGE_FIELD: pixels}, images


def build_images(
    root: str | os.PathLike,
    dataset: MapDataset,
    *,
    dataset_fingerprint: str,
    batch_size: int = 256,
    shard_size: int = 4096,
    num_workers: int = 0,
    progress: bool = True,
) -> None:
    """Decode every item of `dataset` once and store it (fastdae.cache.writer.build; under
    torch.distributed every rank calls this and writes its own shards)."""
    from fastdae.cache.writer import build

    build(
        Path(root),
        dataset,
        _encode,
        batch_size=batch_size,
        shard_size=shard_size,
        encoder_sha256=IMAGE_ENCODER,
        dataset_fingerprint=dataset_fingerprint,
        flip=False,  # flips are made on read: see the module docstring
        num_workers=num_workers,
        progress=progress,
    )


class ImageCache(IndexSpace):
    """The stored images in the latent cache's index space (an IndexSpace): len(self) is n, or 2n with
    `flip` (items i >= n are item i - n flipped along W). `__getitems__` returns (images float32
    (B, 3, H, W) in [-1, 1], labels int64 (B,)), what FlipView(dataset, flip) returns, read without
    decoding: the cache stage encodes the latents from it, and stage 2 reads its targets from it.

    `uint8=True` returns the stored pixels instead, for to_signed_unit on the training device: a
    quarter of the bytes to copy there, and the float conversion (at 256 px most of the loader's
    remaining CPU time) runs on the GPU, with the same floats (IEEE division either way).

    Opening checks the manifest (checksum, schema), every shard's size, that it holds images of
    `image_size` and was built from the dataset with `dataset_fingerprint`; each shard's sha256 is
    checked before its first read (LatentCache verify="lazy"), or, over several processes, once per
    run split over the ranks (`verify_split`). Any mismatch is a CacheError.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        dataset_fingerprint: str,
        flip: bool,
        image_size: tuple[int, int],
        uint8: bool = False,
    ) -> None:
        self.root = Path(root)
        self.cache = LatentCache(self.root, verify="lazy")
        m = self.cache.manifest
        if m["encoder_sha256"] != IMAGE_ENCODER or m["flip"]:
            raise CacheError(
                f"{self.root} is not an image cache (encoder_sha256 {m['encoder_sha256']!r}, flip {m['flip']}; "
                f"expected {IMAGE_ENCODER!r}, false)"
            )
        self.cache.check(dataset_fingerprint=dataset_fingerprint)
        want = {IMAGE_FIELD: [3, *image_size], LABEL: []}
        have = {name: spec["shape"] for name, spec in m["fields"].items()}
        if have != want or m["fields"][IMAGE_FIELD]["dtype"] != "uint8":
            raise CacheError(f"image cache {self.root} holds fields {have}, expected {want} (uint8 images)")
        self.n, self.flip, self.uint8 = len(self.cache), flip, uint8

    def __repr__(self) -> str:
        return f"image cache {self.root}"

    def verify_split(self) -> None:
        """Under torch.distributed (a collective: every rank calls it): rank r checks the sha256 of
        shards r, r + W, ... now, the ranks share what they found (a bad shard is a CacheError on every
        rank), and each rank then skips the hash of the shards the others checked. Without it every
        process hashes the whole cache in its first epoch, since a shuffled order touches every shard:
        252 GB per process for ImageNet at 256 px. Outside torch.distributed it does nothing (each
        shard is hashed before its first read)."""
        rank, world = files.dist_rank_world()
        if world == 1:
            return
        mine = list(range(rank, self.cache.num_shards, world))
        try:
            self.cache.verify(mine)
            problem = None
        except CacheError as e:
            problem = str(e)
        found: list[str | None] = [None] * world
        torch.distributed.all_gather_object(found, problem)
        bad = [p for p in found if p is not None]
        if bad:
            raise CacheError(bad[0] + (f" (and {len(bad) - 1} more rank(s) found a bad shard)" if len(bad) > 1 else ""))
        self.cache.trust([k for k in range(self.cache.num_shards) if k % world != rank])

    def _read(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        fields = self.cache.gather(idx, widen=False)
        return fields[IMAGE_FIELD], fields[LABEL].to(torch.int64)

    def __getitems__(self, indices: list[int] | np.ndarray) -> tuple[Tensor, Tensor]:
        pixels, labels = super().__getitems__(indices)  # flipped as uint8: a quarter of the bytes
        return pixels if self.uint8 else to_signed_unit(pixels), labels
