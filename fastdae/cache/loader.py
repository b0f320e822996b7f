"""Loading batches from a latent cache: CacheLoader (prefetching, step-indexed order, DDP sharding),
with the images of the same indices when paired with an image dataset (stage 2)."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fastdae import files
from fastdae.cache.format import IndexSpace, index_space

if TYPE_CHECKING:
    from fastdae.cache.reader import LatentCache
    from fastdae.data import MapDataset


class CacheLoader:
    """Batches from a LatentCache, gathered whole from the memory maps and prefetched by background threads.

    Yields dict[str, Tensor] (name -> (B, *shape)), or (fields, images (B, 3, H, W)) when built
    with an image dataset (`LatentCache.paired_loader`), where items >= len(dataset) are the
    flipped images; an ImageCache (fastdae.cache.images) in place of the dataset gives the same
    images without decoding a file.

    Order: batch b of epoch e holds items indices(e)[b*B:(b+1)*B] in ascending order (order within a
    batch does not matter to a mean loss, and ascending reads are fastest); epoch e uses permutation
    `np.random.default_rng([seed, e])` of all items (identity without shuffle). Under
    torch.distributed (or with explicit rank/world_size) rank r takes every world_size-th index of
    it, so ranks never overlap and all get len(self) batches (the
    tail is dropped with drop_last, else padded by wrapping around, as DistributedSampler does).
    Each full pass over the loader advances the epoch, which starts at `epoch_offset`;
    `set_epoch(e, start_batch)` jumps anywhere, so a run resumed at global step s calls
    `set_epoch(epoch_offset + s // len(loader), s % len(loader))` and sees the same batches.

    `num_workers` gather threads (at least one) run up to `prefetch` batches ahead of the consumer,
    refilled in bulk whenever half of them have been taken;
    the gathers spend little time holding the GIL (one np.take per shard and field, widening in
    torch), so the training step does not wait. `pin_memory=True` pins batches (CUDA builds) for
    non_blocking host-to-device copies.
    """

    def __init__(
        self,
        cache: LatentCache,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        num_workers: int = 0,
        epoch_offset: int = 0,
        image_dataset: MapDataset | None = None,
        prefetch: int = 8,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1 or prefetch < 1 or num_workers < 0:
            raise ValueError(
                f"need batch_size >= 1, prefetch >= 1, num_workers >= 0; got {batch_size}, {prefetch}, {num_workers}"
            )
        if image_dataset is not None:
            _check_paired(cache, image_dataset)
        dist_rank, dist_world = files.dist_rank_world()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.cache, self.batch_size, self.shuffle, self.seed, self.drop_last = (
            cache,
            batch_size,
            shuffle,
            seed,
            drop_last,
        )
        self.num_threads, self.prefetch = max(1, num_workers), prefetch
        self._pin = pin_memory and torch.cuda.is_available()  # pinning needs a CUDA build and device
        self.images: IndexSpace | None = (
            None if image_dataset is None else index_space(image_dataset, cache.manifest["flip"])
        )
        self.epoch, self.start_batch = epoch_offset, 0
        n, w = len(cache), self.world_size
        self.per_rank = n // w if drop_last else math.ceil(n / w)
        if self.per_rank == 0 or (drop_last and self.per_rank < batch_size):
            raise ValueError(f"a cache of {n} items over {w} rank(s) gives no full batch of {batch_size}")

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.per_rank // self.batch_size if self.drop_last else math.ceil(self.per_rank / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration epoch `epoch`, starting at its batch `start_batch`."""
        if not 0 <= start_batch < len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}), got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's item indices for `epoch`: batch b holds [b*B, (b+1)*B) of them, sorted ascending."""
        n, w = len(self.cache), self.world_size
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        total = self.per_rank * w
        order = order[:total] if total <= n else np.concatenate([order, order[: total - n]])
        return order[self.rank :: w]

    def _load(self, idx: np.ndarray) -> Any:
        idx = np.sort(idx)  # order within a batch does not matter to training; ascending gathers fastest
        fields = self.cache.gather(idx)
        if self._pin:
            fields = {name: t.pin_memory() for name, t in fields.items()}
        if self.images is None:
            return fields
        images = self.images.__getitems__(idx.tolist())[0]  # an IndexSpace batches its reads
        return fields, images.pin_memory() if self._pin else images

    def __iter__(self) -> Iterator[Any]:
        epoch, first = self.epoch, self.start_batch
        idx, bs = self.indices(epoch), self.batch_size
        todo = iter(range(first, len(self)))
        pool = ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="fastdae-cache")
        ahead: deque[Future] = deque()

        def refill() -> None:
            for b in itertools.islice(todo, self.prefetch - len(ahead)):
                ahead.append(pool.submit(self._load, idx[b * bs : (b + 1) * bs]))

        try:
            refill()
            while ahead:
                batch = ahead.popleft().result()
                # refill in bulk once half the queue is used: waking the gather threads costs the
                # consumer a context switch, on a busy CPU far more than the gather itself
                if len(ahead) <= self.prefetch // 2:
                    refill()
                yield batch
            self.epoch, self.start_batch = epoch + 1, 0
        finally:  # also when the consumer stops early: drop what was prefetched
            pool.shutdown(wait=True, cancel_futures=True)


def _check_paired(cache: LatentCache, image_dataset: MapDataset) -> None:
    flip = cache.manifest["flip"]
    if isinstance(image_dataset, IndexSpace):  # e.g. the image cache: already in an index space
        if image_dataset.flip != flip or image_dataset.n != cache.dataset_len:
            raise ValueError(
                f"{image_dataset!r} of {image_dataset.n} images (flip={image_dataset.flip}) does "
                f"not match latent cache {cache.root} of {cache.dataset_len} dataset items (flip={flip})"
            )
        return
    n = len(image_dataset)
    if n * (2 if flip else 1) != len(cache):
        raise ValueError(
            f"image dataset of {n} items does not match latent cache {cache.root} of {len(cache)} items (flip={flip})"
        )
