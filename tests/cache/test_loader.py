"""Loading batches (fastdae.cache.loader): a deterministic step-indexed order, background prefetching,
and (latent, image) pairs for stage 2."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from fastdae.data import ProceduralShapes
from tests.utils import (
    IndexImages,
    build,
    encode_kl,
)


def _epoch(loader) -> list[list[int]]:
    """One pass: each batch's `value` (= item index), checked against loader.indices (ascending per batch)."""
    epoch, start, bs = loader.epoch, loader.start_batch, loader.batch_size
    batches = [batch["value"].tolist() for batch in loader]
    order = loader.indices(epoch).tolist()
    assert batches == [sorted(order[k * bs : (k + 1) * bs]) for k in range(start, len(loader))]
    return batches


def test_loader_order_is_deterministic(tmp_path):
    cache = build(tmp_path, IndexImages(50))
    loader = cache.loader(8, seed=3)
    assert len(loader) == 6
    first, second = _epoch(loader), _epoch(loader)  # each full pass advances the epoch
    assert first != second and loader.epoch == 2
    assert first == _epoch(cache.loader(8, seed=3)) and first != _epoch(cache.loader(8, seed=4))
    assert second == _epoch(cache.loader(8, seed=3, epoch_offset=1))
    assert all(len(set(b)) == 8 for b in first) and len({i for b in first for i in b}) == 48
    loader.set_epoch(0, start_batch=4)  # a run resumed at step 4
    assert _epoch(loader) == first[4:]
    assert _epoch(cache.loader(8, shuffle=False)) == [list(range(a, a + 8)) for a in range(0, 48, 8)]

    tail = _epoch(cache.loader(8, shuffle=False, drop_last=False))
    assert len(tail) == 7 and tail[-1] == [48, 49]
    ranks = [cache.loader(8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == 3 and not set(ranks[0].indices(5)) & set(ranks[1].indices(5))
    padded = [cache.loader(8, seed=3, drop_last=False, rank=r, world_size=3) for r in range(3)]
    assert all(len(p.indices(0)) == 17 for p in padded)  # 50 items padded to 51 by wrapping around
    assert set(np.concatenate([p.indices(0) for p in padded])) == set(range(50))
    with pytest.raises(ValueError, match="no full batch"):
        cache.loader(64)


def test_loader_prefetches_in_background(tmp_path, monkeypatch):
    cache = build(tmp_path, IndexImages(64))
    gathered, threads = [], set()
    original = cache.gather

    def gather(indices):
        threads.add(threading.current_thread().name)
        out = original(indices)
        gathered.append(len(indices))
        return out

    monkeypatch.setattr(cache, "gather", gather)
    loader = cache.loader(4, prefetch=4, num_workers=2)
    it = iter(loader)

    def gathered_reaches(n: int) -> bool:
        deadline = time.monotonic() + 10
        while len(gathered) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # and goes no further
        return len(gathered) == n

    next(it)
    assert gathered_reaches(4), "`prefetch` batches are gathered before they are asked for"
    next(it)
    assert gathered_reaches(6), "once half the queue is used it is refilled"
    assert threads and all(name.startswith("fastdae-cache") for name in threads)
    it.close()  # stopping early shuts the gather threads down
    assert not [t for t in threading.enumerate() if t.name.startswith("fastdae-cache")]


def test_paired_loading(tmp_path):
    ds = ProceduralShapes(12, size=16, seed=7)
    cache = build(tmp_path, ds, encode_kl, flip=True)
    images, _ = ds.images(np.arange(12))
    images = torch.cat([images, images.flip(-1)])
    fields, _ = encode_kl(images)
    loader = cache.paired_loader(ds, 6, seed=2)
    order = loader.indices(0)
    assert sorted(order) == list(range(24))
    for b, (batch_fields, batch_images) in enumerate(loader):
        idx = np.sort(order[b * 6 : (b + 1) * 6])
        assert torch.equal(batch_images, images[idx])
        assert torch.equal(batch_fields["mean"], fields["mean"][idx].half().float())
    with pytest.raises(ValueError, match="does not match latent cache"):
        cache.paired_loader(ProceduralShapes(13, size=16), 6)
