"""The held-out split (stratified, seeded) and the dataset fingerprint the latent cache records."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fastdae.data.config import (
    DataConfig,
    DataError,
    ImageDataset,
    LabeledDataset,
    MapDataset,
)
from fastdae.data.procedural import (
    ProceduralDataset,
)


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of the N items (int64 (N,)) in which every prefix, and every run of
    consecutive items, holds each class in about its share: a class's n items, shuffled, get the keys
    (k + u_k) / n (k = 0..n-1, u_k ~ U[0, 1)), i.e. evenly spread quantiles, and items go in key
    order. A prefix of h items then holds round(h n / N) of the class, give or take one."""
    rng = np.random.default_rng([seed, 0x5EED])  # its own stream: the split never moves with other draws
    labels = np.asarray(labels, dtype=np.int64)
    keys = np.empty(len(labels))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = len(members)
        keys[rng.permutation(members)] = (np.arange(n) + rng.random(n)) / n
    return np.argsort(keys, kind="stable")


class DatasetSplit(Dataset):
    """The items `indices` (int64 (n,), into `base`) of a dataset, in that order: one part of
    `split_dataset`. Labels, classes and `num_classes` are the base dataset's (a part may lack a
    class); its identity is the base's plus the part's name and indices, so a fingerprint of a part
    covers the split."""

    def __init__(self, base: LabeledDataset, indices: np.ndarray, part: str) -> None:
        self.base, self.indices, self.part = base, np.asarray(indices, dtype=np.int64), part
        self.labels = np.asarray(base.labels)[self.indices]
        self.num_classes = base.num_classes
        self.classes = getattr(base, "classes", None)
        self.image_size = base.image_size

    def __len__(self) -> int:
        return len(self.indices)

    def identity(self) -> dict[str, Any]:
        return {
            "base": getattr(self.base, "identity", dict)(),
            "part": self.part,
            "version": 1,
            "indices_sha256": hashlib.sha256(self.indices.tobytes()).hexdigest(),
        }

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.base[int(self.indices[i])]


def split_dataset(ds: ProceduralDataset | LabeledDataset, cfg: DataConfig) -> tuple[ImageDataset, ImageDataset]:
    """(train, heldout): training (stage 1, the cache, stage 2, the prior) sees only `train`, the
    evaluation judge only `heldout`; deterministic for a config (seeded by cfg.seed).

    A ProceduralDataset (shapes, textures): train is `ds` itself (its num_samples items, generator
    indices [offset, offset + num_samples)); heldout is cfg.holdout_count(num_samples) items generated
    from the next indices of the same seed, which never repeat a training item (see ProceduralDataset).
    Any other dataset (it needs `labels` and `num_classes`): heldout is the first
    cfg.holdout_count(N) items of `stratified_order` (each class held out in its share, give or take
    one; kept in that order, so any run of it is stratified too) and train is the rest in index order;
    together they are every item once. A holdout that leaves no training item is an error."""
    if isinstance(ds, ProceduralDataset):
        h = max(1, cfg.holdout_count(len(ds)))  # a dataset has >= 1 item
        return ds, ds.part(len(ds), len(ds) + h)
    n, h = len(ds), cfg.holdout_count(len(ds))
    if h >= n:
        raise DataError(
            f"DataConfig.holdout={cfg.holdout!r} holds out {h} of the dataset's {n} items and leaves "
            f"none to train on; lower it"
        )
    order = stratified_order(ds.labels, cfg.seed)
    return DatasetSplit(ds, np.sort(order[h:]), "train"), DatasetSplit(ds, order[:h], "heldout")


def dataset_fingerprint(ds: MapDataset, num_probes: int = 8) -> str:
    """sha256 hex of a dataset's identity: class, `identity()` (if defined), length, and `num_probes`
    items spread over the index range. fastdae's identities cover every image: an array's content
    hash, a folder's per-file stat (see ImageFolder.identity), a procedural one's generator settings; the
    probes guard other datasets. Probes are drawn under a fixed torch seed (random crops and flips
    repeat) and hashed after rounding to 8 bits, so last-bit float differences between machines
    do not change the fingerprint."""
    n = len(ds)
    ident: dict[str, Any] = getattr(ds, "identity", dict)()
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"class": f"{type(ds).__module__}.{type(ds).__qualname__}", "len": n, "identity": ident}, sort_keys=True
        ).encode()
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i in sorted({int(k) for k in np.linspace(0, n - 1, num=min(num_probes, n))}):
            image, label = ds[i]
            q = torch.round((image.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
            h.update(f"{i}:{tuple(q.shape)}:{int(label)}:".encode())
            h.update(q.numpy().tobytes())
    return h.hexdigest()
