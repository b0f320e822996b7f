"""The latent cache's on-disk format: names, dtypes, the manifest (schema and checksum), the index space.

Layout of a cache folder:
    manifest.json                       written last, by rank 0: the cache is valid iff it exists
    shard-r{rank:03d}-{k:05d}.safetensors   global shard k = items [k*shard_size, (k+1)*shard_size)
    shard-r{rank:03d}-{k:05d}.safetensors.json  sidecar: sha256, range, per-shard channel moments

The manifest carries its own checksum: "checksum" is the sha256 of the other keys as compact JSON
with sorted keys, so an edited field (e.g. the channel statistics the prior scales by) is detected.
`read_manifest` checks it and the schema; every problem is a CacheError naming the file and key.
Shard file names must match the writer's pattern: a manifest never makes the reader open another file.

Index space: with n dataset items, item i < n is dataset[i]; with flip=True, items n..2n-1 are the
horizontally flipped copies of 0..n-1 (their images were flipped before encoding). An IndexSpace
serves the images of that index space: FlipView through a dataset, or the decoded-image cache
(fastdae.cache.images.ImageCache) from its shards; `index_space` gives the one for a dataset.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from fastdae.data import MapDataset

T = TypeVar("T")

FORMAT_VERSION = 2  # 2: the manifest carries a checksum
MANIFEST = "manifest.json"
LABEL = "label"
STORED_FLOAT = np.dtype(np.float16)
# smallest first; np.result_type of two of them is again one of them
INT_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64))
SAFETENSORS_DTYPES = {
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "I32": np.int32,
    "U32": np.uint32,
    "I64": np.int64,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
}
FIELD_DTYPES = {d.name for d in INT_DTYPES} | {STORED_FLOAT.name}  # what a manifest field may be stored as
TORCH_READ = {"u": torch.int64, "i": torch.int64, "f": torch.float32}  # what reads return, by stored dtype kind
SHARD_PATTERN = re.compile(r"shard-r\d{3}-\d{5}\.safetensors")


class CacheError(ValueError):
    """A cache on disk that is missing, corrupted, truncated, or does not match its manifest."""


def shard_name(rank: int, k: int) -> str:
    return f"shard-r{rank:03d}-{k:05d}.safetensors"


def checksum(body: dict[str, Any]) -> str:
    """sha256 of a manifest body (every key but "checksum") as compact JSON with sorted keys."""
    text = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_number_list(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) > 0
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in v)
    )


# top-level key -> (test, what it must be)
_SCHEMA: dict[str, tuple[Any, str]] = {
    "count": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "dataset_len": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "shard_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "flip": (lambda v: isinstance(v, bool), "true or false"),
    "encoder_sha256": (lambda v: isinstance(v, str), "a string"),
    "dataset_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "fields": (lambda v: isinstance(v, dict) and len(v) > 0, "a mapping of field names"),
    "shards": (lambda v: isinstance(v, list) and len(v) > 0, "a list of shard records"),
    "channel_mean": (_is_number_list, "a list of finite numbers"),
    "channel_std": (_is_number_list, "a list of finite numbers"),
}
_SHARD_SCHEMA: dict[str, tuple[Any, str]] = {
    "file": (
        lambda v: isinstance(v, str) and SHARD_PATTERN.fullmatch(v) is not None,
        "a shard file name in the cache folder (shard-rNNN-NNNNN.safetensors)",
    ),
    "start": (_is_int, "an integer >= 0"),
    "stop": (_is_int, "an integer >= 0"),
    "bytes": (_is_int, "an integer >= 0"),
    "sha256": (lambda v: isinstance(v, str), "a string"),
}


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at `path`, checked: JSON object, format version, checksum, schema."""
    try:
        m = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
        raise CacheError(f"{path} is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(m, dict):
        raise CacheError(f"{path}: expected a JSON object, got {type(m).__name__}")
    if m.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path}: format version {m.get('format_version')!r}, this fastdae reads {FORMAT_VERSION}; "
            f"rebuild the cache"
        )
    if m.get("checksum") != checksum(m):
        raise CacheError(f"{path}: its checksum does not match its content (edited or corrupted); rebuild the cache")
    for key, (ok, what) in _SCHEMA.items():
        if key not in m or not ok(m[key]):
            raise CacheError(f"{path}: {key!r} must be {what}, got {m.get(key, '(absent)')!r}")
    if len(m["channel_mean"]) != len(m["channel_std"]):
        raise CacheError(
            f"{path}: channel_mean has {len(m['channel_mean'])} channels, channel_std {len(m['channel_std'])}"
        )
    for name, spec in m["fields"].items():
        if not isinstance(spec, dict) or spec.get("dtype") not in FIELD_DTYPES:
            raise CacheError(
                f"{path}: field {name!r} dtype must be one of {sorted(FIELD_DTYPES)}, got "
                f"{spec.get('dtype') if isinstance(spec, dict) else spec!r}"
            )
        shape = spec.get("shape")
        if not (isinstance(shape, list) and all(_is_int(d) for d in shape)):
            raise CacheError(f"{path}: field {name!r} shape must be a list of sizes, got {shape!r}")
    for i, shard in enumerate(m["shards"]):
        for key, (ok, what) in _SHARD_SCHEMA.items():
            if not isinstance(shard, dict) or not ok(shard.get(key)):
                raise CacheError(
                    f"{path}: shards[{i}] {key!r} must be {what}, got "
                    f"{shard.get(key, '(absent)') if isinstance(shard, dict) else shard!r}"
                )
    return m


def gather_images(dataset: MapDataset, indices: np.ndarray) -> tuple[Tensor, Tensor]:
    """Dataset items -> images (B, 3, H, W), labels int64 (B,); batched through `__getitems__` when
    the dataset has it (ProceduralShapes renders a whole batch at once)."""
    idx = [int(i) for i in indices]
    items = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else [dataset[i] for i in idx]
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.int64)
    return images, labels


class IndexSpace(Dataset, ABC):
    """Images in a cache's index space over n dataset items: len(self) is n, or 2n with `flip` (item
    i >= n is item i - n flipped along W). `__getitems__` returns the stacked batch (images (B, 3, H, W),
    labels int64 (B,)), not torch's list of samples. Subclasses read the unflipped items (`_read`)."""

    n: int
    flip: bool

    @abstractmethod
    def _read(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) and labels int64 (B,) of items idx, all < n."""

    def __len__(self) -> int:
        return self.n * (2 if self.flip else 1)

    def __getitems__(self, indices: list[int] | np.ndarray) -> tuple[Tensor, Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"cache index out of range [0, {len(self)})")
        images, labels = self._read(idx % self.n)
        flipped = torch.from_numpy(idx >= self.n)
        if flipped.any():
            images[flipped] = images[flipped].flip(-1)
        return images, labels

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([i])
        return images[0], labels[0]


class FlipView(IndexSpace):
    """A dataset's items in the cache's index space, read through the dataset."""

    def __init__(self, dataset: MapDataset, flip: bool) -> None:
        self.dataset, self.n, self.flip = dataset, len(dataset), flip

    def _read(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        return gather_images(self.dataset, idx)


def index_space(dataset: MapDataset | IndexSpace, flip: bool) -> IndexSpace:
    """`dataset` in the index space of a cache with `flip`: an IndexSpace (the image cache,
    fastdae.cache.images) already is, with that flip; any other dataset is wrapped in FlipView."""
    if not isinstance(dataset, IndexSpace):
        return FlipView(dataset, flip)
    if dataset.flip != flip:
        raise ValueError(f"images in an index space with flip={dataset.flip} given for a cache with flip={flip}")
    return dataset


def no_collate(batch: T) -> T:
    return batch  # an IndexSpace's __getitems__ already returns the stacked batch
