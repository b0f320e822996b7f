"""The on-disk latent cache: one pass of the frozen encoder over the dataset, read back fast.

    cache = LatentCache.build("run/cache", dataset, encode, encoder_sha256=sha, dataset_fingerprint=fp)
    cache = LatentCache("run/cache")                       # later: verifies every shard's sha256
    for batch in cache.loader(256, seed=0):                # dict[str, Tensor], prefetched
        ...
    for fields, images in cache.paired_loader(dataset, 64):  # stage 2: latents + their images

Layout of `root`:
    manifest.json                       written last, by rank 0: the cache is valid iff it exists
    shard-r{rank:03d}-{k:05d}.safetensors   global shard k = items [k*shard_size, (k+1)*shard_size)
    shard-r{rank:03d}-{k:05d}.safetensors.json  sidecar: sha256, range, per-shard channel moments

Shards are safetensors files: one file per shard holds every field, so a shard is one atomic
rename and one checksum; the format is self-describing (names, dtypes, shapes, offsets in a JSON
header), has no pickle, is readable by any safetensors tool, and its data sections are plain
little-endian arrays at known offsets, which this reader memory-maps with numpy (safetensors' own
loaders copy tensors out, which would defeat batched fancy indexing over the map).

Index space: with n dataset items, item i < n is dataset[i]; with flip=True, items n..2n-1 are the
horizontally flipped copies of 0..n-1 (their images were flipped before encoding).

Fields: what `encode` returns, plus "label". Integer fields are stored in the smallest integer
dtype that holds each shard's values (the manifest gives the promoted dtype over all shards);
float fields are stored as float16. Reads return int64 and float32 tensors.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABEL = "label"
STORED_FLOAT = np.dtype(np.float16)
# smallest first; np.result_type of two of them is again one of them
_INT_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64))
_SAFETENSORS_DTYPES = {"U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "I32": np.int32,
                       "U32": np.uint32, "I64": np.int64, "F16": np.float16, "F32": np.float32, "F64": np.float64}
_HASH_CHUNK = 1 << 20
_TORCH_READ = {"u": torch.int64, "i": torch.int64, "f": torch.float32}  # what reads return, by stored dtype kind

EncodeFn = Callable[[Tensor], tuple[dict[str, Tensor], Tensor]]


class CacheError(ValueError):
    """A cache on disk that is missing, corrupted, truncated, or does not match its manifest."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp name in the same folder, fsync, rename: readers see all of `data` or nothing."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _smallest_int_dtype(lo: int, hi: int) -> np.dtype:
    return next(d for d in _INT_DTYPES if np.iinfo(d).min <= lo and hi <= np.iinfo(d).max)


def _stored(name: str, t: Tensor) -> np.ndarray:
    """A field's values as stored: integers downcast to the smallest dtype that fits, floats as float16."""
    if t.dtype.is_floating_point:
        with np.errstate(over="ignore"):  # overflow to inf is reported just below, with the field's name
            a = t.float().numpy().astype(STORED_FLOAT)
        if not np.isfinite(a).all():
            raise ValueError(f"field {name!r} has non-finite values or exceeds the float16 range (|x| > 65504)")
        return a
    if t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        a = t.numpy()
        return a.astype(_smallest_int_dtype(int(a.min()), int(a.max()))) if a.size else a.astype(np.uint8)
    raise TypeError(f"field {name!r} must be an integer or floating tensor, got {t.dtype}")




class _Moments:
    """Per-channel count, mean and M2 = sum (x - mean)^2 in float64, merged with the exact parallel
    formulas of Chan et al. (1979): n = na + nb, d = mb - ma, mean = ma + d nb / n,
    M2 = M2a + M2b + d^2 na nb / n. Merging in a fixed order makes the result independent of how
    the items were split over ranks."""

    def __init__(self, n: int = 0, mean: np.ndarray | None = None, m2: np.ndarray | None = None) -> None:
        self.n, self.mean, self.m2 = n, mean, m2

    @classmethod
    def of(cls, x: Tensor) -> _Moments:
        """Moments of latents x (B, C, h, w) over batch and positions."""
        x = x.detach().to(torch.float64)
        mean = x.mean(dim=(0, 2, 3))  # (C,)
        m2 = (x - mean[None, :, None, None]).square().sum(dim=(0, 2, 3))
        return cls(x.shape[0] * x.shape[2] * x.shape[3], mean.numpy(), m2.numpy())

    def merge(self, other: _Moments) -> _Moments:
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"stats_latent channel count changed from {self.mean.shape[0]} to {other.mean.shape[0]}")
        n = self.n + other.n
        delta = other.mean - self.mean
        return _Moments(n, self.mean + delta * (other.n / n), self.m2 + other.m2 + delta**2 * (self.n * other.n / n))

    def to_dict(self) -> dict[str, Any]:
        # Python floats round-trip exactly through JSON (repr is shortest-exact)
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Moments:
        return cls(int(d["n"]), np.array(d["mean"], dtype=np.float64), np.array(d["m2"], dtype=np.float64))


def _gather_images(dataset: Dataset, indices: np.ndarray) -> tuple[Tensor, Tensor]:
    """Dataset items -> images (B, 3, H, W), labels int64 (B,); batched through `__getitems__` when
    the dataset has it (ProceduralShapes renders a whole batch at once)."""
    idx = [int(i) for i in indices]
    items = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else [dataset[i] for i in idx]
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.int64)
    return images, labels


class _FlipView(Dataset):
    """Index space of the cache over a dataset of n items: i >= n is item i - n flipped along W."""

    def __init__(self, dataset: Dataset, flip: bool) -> None:
        self.dataset, self.n, self.flip = dataset, len(dataset), flip

    def __len__(self) -> int:
        return self.n * (2 if self.flip else 1)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"cache index out of range [0, {len(self)})")
        images, labels = _gather_images(self.dataset, idx % self.n)
        flipped = torch.from_numpy(idx >= self.n)
        if flipped.any():
            images[flipped] = images[flipped].flip(-1)
        return images, labels

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([i])
        return images[0], labels[0]


def _no_collate(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch  # _FlipView.__getitems__ already returns the stacked batch


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _shard_name(rank: int, k: int) -> str:
    return f"shard-r{rank:03d}-{k:05d}.safetensors"


def _check_encoded(out: Any, batch: int) -> tuple[dict[str, Tensor], Tensor]:
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], dict) and isinstance(out[1], Tensor)):
        raise TypeError("encode must return (fields: dict[str, Tensor], stats_latent: Tensor)")
    fields, latent = out
    if LABEL in fields:
        raise ValueError(f"encode must not return a field named {LABEL!r}: the cache stores the dataset's labels under it")
    for name, t in fields.items():
        if not isinstance(t, Tensor) or t.ndim < 1 or t.shape[0] != batch:
            raise ValueError(f"encode field {name!r} must be a tensor (B={batch}, ...), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if latent.ndim != 4 or latent.shape[0] != batch or not latent.dtype.is_floating_point:
        raise ValueError(f"stats_latent must be a float tensor (B={batch}, C, h, w), got {latent.dtype} {tuple(latent.shape)}")
    return {name: t.detach().cpu() for name, t in fields.items()}, latent.detach().cpu()


def _write_shard(root: Path, rank: int, k: int, start: int, stop: int, parts: dict[str, list[Tensor]],
                 moments: _Moments, identity: dict[str, Any]) -> dict[str, Any]:
    """Write shard k (items start..stop) and its sidecar; return the sidecar record."""
    from safetensors.numpy import save

    arrays = {}
    for name, ts in parts.items():
        shapes = {tuple(t.shape[1:]) for t in ts}
        if len(shapes) != 1:
            raise ValueError(f"field {name!r} changed its per-item shape between batches: {sorted(shapes)}")
        arrays[name] = _stored(name, torch.cat(ts))
    # one metadata key: safetensors writes a metadata map in hash order, and shard bytes (hence their
    # sha256) must not depend on the process that wrote them
    data = save(arrays, metadata={"fastdae": json.dumps({"format_version": FORMAT_VERSION, "start": start, "stop": stop})})
    name = _shard_name(rank, k)
    _atomic_write(root / name, data)
    record = {
        "shard": k, "file": name, "start": start, "stop": stop, "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "fields": {f: {"dtype": a.dtype.name, "shape": list(a.shape[1:])} for f, a in arrays.items()},
        "moments": moments.to_dict(), "identity": identity,
    }
    # the sidecar is written after the shard: a shard without one (killed in between) is re-encoded
    _atomic_write(root / f"{name}.json", json.dumps(record).encode())
    return record


def _reusable_shards(root: Path, identity: dict[str, Any], wanted: range) -> dict[int, dict[str, Any]]:
    """Shards of an earlier, interrupted build of the same cache: sidecar identity and range match,
    and the file's size and sha256 match the sidecar. Any rank's file for shard k will do, so a
    build resumed with another world size still reuses them."""
    found: dict[int, dict[str, Any]] = {}
    for sidecar in sorted(root.glob("shard-r*-*.safetensors.json")):
        try:
            record = json.loads(sidecar.read_text())
            k, path = int(record["shard"]), root / record["file"]
            ok = (record["identity"] == identity and k in wanted and k not in found and path.is_file()
                  and path.stat().st_size == record["bytes"] and _sha256_file(path) == record["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable or foreign sidecar: the shard is encoded again
        if ok:
            found[k] = record
    return found


def _merge_manifest(records: list[dict[str, Any]], identity: dict[str, Any], dataset_len: int,
                    seconds: float, encoded: int, world: int) -> dict[str, Any]:
    records = sorted(records, key=lambda r: r["shard"])
    fields: dict[str, dict[str, Any]] = {}
    for r in records:
        if set(r["fields"]) != set(records[0]["fields"]):
            raise ValueError(f"encode returned fields {sorted(r['fields'])} for shard {r['shard']} but "
                             f"{sorted(records[0]['fields'])} for shard {records[0]['shard']}")
        for name, spec in r["fields"].items():
            prev = fields.setdefault(name, dict(spec))
            if prev["shape"] != spec["shape"]:
                raise ValueError(f"field {name!r} has per-item shape {spec['shape']} in shard {r['shard']}, "
                                 f"{prev['shape']} elsewhere")
            prev["dtype"] = np.result_type(np.dtype(prev["dtype"]), np.dtype(spec["dtype"])).name
    moments = _Moments()
    for r in records:  # shard order, whatever rank wrote it: same floats as a single-process build
        moments = moments.merge(_Moments.from_dict(r["moments"]))
    return {
        "format_version": FORMAT_VERSION,
        "encoder_sha256": identity["encoder_sha256"],
        "dataset_fingerprint": identity["dataset_fingerprint"],
        "count": identity["count"],
        "dataset_len": dataset_len,
        "flip": identity["flip"],
        "shard_size": identity["shard_size"],
        "fields": fields,
        "shards": [{k: r[k] for k in ("file", "start", "stop", "bytes", "sha256")} for r in records],
        # population statistics of stats_latent over items and positions, per channel
        "channel_mean": moments.mean.tolist(),
        "channel_std": np.sqrt(moments.m2 / moments.n).tolist(),
        "channel_count": moments.n,
        "build": {"seconds": seconds, "encoded": encoded, "latents_per_second": encoded / max(seconds, 1e-9),
                  "reused_shards": sum(not r.get("encoded", False) for r in records), "world_size": world,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class _Shard:
    """One shard file: size checked on open; sha256 verified and arrays memory-mapped on first use."""

    def __init__(self, path: Path, record: dict[str, Any], fields: dict[str, dict[str, Any]]) -> None:
        self.path, self.record, self.fields = path, record, fields
        self.start, self.stop = int(record["start"]), int(record["stop"])
        self._arrays: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def check_size(self) -> None:
        if not self.path.is_file():
            raise CacheError(f"cache shard {self.path} is missing")
        size = self.path.stat().st_size
        if size != self.record["bytes"]:
            raise CacheError(f"cache shard {self.path} is {size} bytes, the manifest says {self.record['bytes']} "
                             f"(truncated or overwritten); rebuild the cache")

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return self._arrays if self._arrays is not None else self.open()

    def open(self) -> dict[str, np.ndarray]:
        """Verify the file (size, sha256, header against the manifest) and memory-map its fields."""
        with self._lock:  # loader threads may touch a lazily verified shard at the same time
            if self._arrays is None:
                self._arrays = self._map()
        return self._arrays

    def _map(self) -> dict[str, np.ndarray]:
        self.check_size()
        if _sha256_file(self.path) != self.record["sha256"]:
            raise CacheError(f"cache shard {self.path} is corrupted: its sha256 does not match the manifest")
        with open(self.path, "rb") as f:  # the map outlives the file object
            raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            (header_len,) = struct.unpack_from("<Q", raw, 0)
            header = json.loads(raw[8:8 + header_len])
        except (struct.error, ValueError) as e:
            raise CacheError(f"cache shard {self.path} has no valid safetensors header: {e}") from e
        base, n, arrays = 8 + header_len, self.stop - self.start, {}
        for name, spec in self.fields.items():
            entry = header.get(name)
            stored = np.dtype(_SAFETENSORS_DTYPES.get(entry["dtype"], np.void)) if entry else None
            shape = (n, *spec["shape"])
            if entry is None or tuple(entry["shape"]) != shape or not np.can_cast(stored, np.dtype(spec["dtype"]), "safe"):
                raise CacheError(f"cache shard {self.path}: field {name!r} is {entry and (entry['dtype'], entry['shape'])}, "
                                 f"the manifest says {spec['dtype']} {list(shape)}")
            lo, hi = entry["data_offsets"]
            # plain ndarrays over the map (np.memmap's subclass hooks cost more than the copy itself)
            arrays[name] = np.frombuffer(raw, dtype=stored.newbyteorder("<"), count=(hi - lo) // stored.itemsize,
                                         offset=base + lo).reshape(shape)
        return arrays

    def __getstate__(self) -> dict[str, Any]:
        # maps and locks do not pickle (a DataLoader worker re-opens the file)
        return {"path": self.path, "record": self.record, "fields": self.fields}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["record"], state["fields"])


class LatentCache:
    """A latent cache on disk (see the module docstring), memory-mapped.

    verify="open" checks every shard's sha256 here (reads the whole cache once); verify="lazy"
    checks only sizes here and each shard's sha256 on its first touch, for caches too large to
    hash up front. Either way a corrupted, truncated or mismatched shard raises CacheError naming
    the file before any of its data is returned.
    """

    def __init__(self, root: str | os.PathLike, verify: Literal["open", "lazy"] = "open") -> None:
        if verify not in ("open", "lazy"):
            raise ValueError(f"verify must be 'open' or 'lazy', got {verify!r}")
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise CacheError(f"no latent cache at {self.root}: {path} does not exist (build it first, "
                             f"or an interrupted build has not finished)")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        except ValueError as e:
            raise CacheError(f"{path} is not valid JSON: {e}") from e
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path}: format version {self.manifest.get('format_version')}, this fastdae reads {FORMAT_VERSION}")
        m = self.manifest
        self.fields: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            name: (getattr(torch, spec["dtype"]), tuple(spec["shape"])) for name, spec in m["fields"].items()
        }
        self._shards = [_Shard(self.root / s["file"], s, m["fields"]) for s in m["shards"]]
        ends = [0] + [s.stop for s in self._shards]
        if [s.start for s in self._shards] != ends[:-1] or ends[-1] != m["count"]:
            raise CacheError(f"{path}: shard ranges do not tile [0, {m['count']})")
        self._starts = np.array(ends[:-1], dtype=np.int64)
        self.channel_mean = torch.tensor(m["channel_mean"], dtype=torch.float32)  # (C,)
        self.channel_std = torch.tensor(m["channel_std"], dtype=torch.float32)  # (C,)
        for shard in self._shards:
            if verify == "open":
                shard.open()
            else:
                shard.check_size()

    @classmethod
    def build(cls, root: str | os.PathLike, dataset: Dataset, encode: EncodeFn, *,
              batch_size: int = 256, shard_size: int = 4096, encoder_sha256: str, dataset_fingerprint: str,
              flip: bool = False, num_workers: int = 0, progress: bool = True) -> LatentCache:
        """Encode every item of `dataset` (and flipped copies with flip=True) once and write the cache.

        `encode(images (B, 3, H, W) float) -> (fields, stats_latent)` is called under torch.no_grad;
        fields map names to (B, ...) tensors to store (e.g. VQ {"indices": (B, h, w) int64}, KL
        {"mean", "logvar": (B, C, h, w)}); stats_latent (B, C, h, w) gives the per-channel mean/std.
        Batches never straddle a shard, so shard contents do not depend on the number of ranks.

        Under torch.distributed every rank calls this with the same arguments and encodes its own
        contiguous block of shards; rank 0 writes the manifest after all ranks have finished.
        Resuming: shards from an interrupted build with the same encoder, dataset, flip, shard_size and
        count whose sha256 matches their sidecar are kept; everything else is encoded again.
        Returns the cache opened with verify="lazy" (every shard was just hashed).
        """
        if batch_size < 1 or shard_size < 1:
            raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
        if len(dataset) == 0:
            raise ValueError("cannot build a latent cache of an empty dataset")
        t0 = time.perf_counter()
        root = Path(root)
        rank, world = _dist_rank_world()
        view = _FlipView(dataset, flip)
        count = len(view)
        identity = {"format_version": FORMAT_VERSION, "encoder_sha256": encoder_sha256,
                    "dataset_fingerprint": dataset_fingerprint, "flip": bool(flip), "shard_size": shard_size, "count": count}
        num_shards = math.ceil(count / shard_size)
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            (root / MANIFEST).unlink(missing_ok=True)  # the old manifest must not vouch for shards being rewritten
        if world > 1:
            torch.distributed.barrier()
        mine = range(rank * num_shards // world, (rank + 1) * num_shards // world)
        records = _reusable_shards(root, identity, mine)
        pending = [k for k in mine if k not in records]
        ranges = {k: (k * shard_size, min((k + 1) * shard_size, count)) for k in pending}
        batches = [list(range(a, min(a + batch_size, stop))) for start, stop in ranges.values()
                   for a in range(start, stop, batch_size)]
        loader = iter(DataLoader(view, batch_sampler=batches, num_workers=num_workers, collate_fn=_no_collate)
                      if batches else ())

        from tqdm import tqdm

        bar = tqdm(total=sum(stop - start for start, stop in ranges.values()), unit="latent", unit_scale=True,
                   desc=f"latent cache (rank {rank})" if world > 1 else "latent cache", disable=not progress or rank != 0)
        with torch.no_grad(), bar:
            for k, (start, stop) in ranges.items():
                parts: dict[str, list[Tensor]] = {}
                moments = _Moments()
                for _ in range(start, stop, batch_size):
                    images, labels = next(loader)
                    fields, latent = _check_encoded(encode(images), len(images))
                    if parts and set(fields) | {LABEL} != set(parts):
                        raise ValueError(f"encode returned fields {sorted(fields)}, earlier {sorted(set(parts) - {LABEL})}")
                    for name, t in (*fields.items(), (LABEL, labels)):
                        parts.setdefault(name, []).append(t)
                    moments = moments.merge(_Moments.of(latent))
                    bar.update(len(images))
                records[k] = {**_write_shard(root, rank, k, start, stop, parts, moments, identity), "encoded": True}

        mine_records = list(records.values())
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, mine_records)
            mine_records = [r for rs in gathered for r in rs]
        if rank == 0:
            encoded = sum(r["stop"] - r["start"] for r in mine_records if r.get("encoded"))
            manifest = _merge_manifest(mine_records, identity, len(dataset), time.perf_counter() - t0, encoded, world)
            _atomic_write(root / MANIFEST, json.dumps(manifest, indent=1).encode())
            _remove_unlisted(root, {s["file"] for s in manifest["shards"]})
        if world > 1:
            torch.distributed.barrier()
        return cls(root, verify="lazy")

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dataset_len(self) -> int:
        """Items of the source dataset (len(self) is twice that with flip copies)."""
        return int(self.manifest["dataset_len"])

    def check(self, encoder_sha256: str | None = None, dataset_fingerprint: str | None = None) -> None:
        """Raise CacheError if the cache was built from another encoder checkpoint or dataset."""
        for key, want in (("encoder_sha256", encoder_sha256), ("dataset_fingerprint", dataset_fingerprint)):
            if want is not None and self.manifest[key] != want:
                raise CacheError(f"latent cache {self.root} has {key} {self.manifest[key]}, expected {want}; rebuild it")

    def gather(self, indices: np.ndarray | list[int]) -> dict[str, Tensor]:
        """Fields of a batch of items, gathered straight from the memory maps: name -> (B, *shape).
        Ascending indices (as the loader passes them) are fastest: each shard's run of items is
        copied with one np.take per field into a contiguous slice of the batch."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"cache index out of range [0, {len(self)})")
        order = np.argsort(idx, kind="stable")
        ascending = bool((order == np.arange(len(idx))).all())
        sidx = idx if ascending else idx[order]
        out = {name: np.empty((len(idx), *spec["shape"]), dtype=spec["dtype"])
               for name, spec in self.manifest["fields"].items()}
        shard_of = np.searchsorted(self._starts, sidx, side="right") - 1  # (B,) non-decreasing
        cuts = [0, *(np.flatnonzero(np.diff(shard_of)) + 1).tolist(), len(idx)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            s = int(shard_of[a])
            local = sidx[a:b] - self._starts[s]
            for name, array in self._shards[s].arrays.items():
                dst = out[name][a:b]
                if array.dtype == dst.dtype:
                    np.take(array, local, axis=0, out=dst)  # no temporary
                else:
                    dst[...] = array[local]  # a shard stored narrower than the manifest's dtype
        # widen once per field (int64 / float32), in torch, which releases the GIL
        result = {name: torch.from_numpy(a).to(_TORCH_READ[a.dtype.kind]) for name, a in out.items()}
        if not ascending:
            inverse = torch.from_numpy(np.argsort(order))
            result = {name: t[inverse] for name, t in result.items()}
        return result

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"cache index {i} out of range [0, {len(self)})")
        return {name: t[0] for name, t in self.gather([i % len(self)]).items()}

    def loader(self, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
               num_workers: int = 0, epoch_offset: int = 0, **kwargs: Any) -> CacheLoader:
        """Batches of fields (see CacheLoader)."""
        return CacheLoader(self, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                           num_workers=num_workers, epoch_offset=epoch_offset, **kwargs)

    def paired_loader(self, image_dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                      drop_last: bool = True, num_workers: int = 0, epoch_offset: int = 0, **kwargs: Any) -> CacheLoader:
        """Batches of (fields, images) with the same indices, for stage 2 (see CacheLoader)."""
        return CacheLoader(self, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, num_workers=num_workers,
                           epoch_offset=epoch_offset, image_dataset=image_dataset, **kwargs)


def _remove_unlisted(root: Path, listed: set[str]) -> None:
    """Delete shards (and sidecars, temp files) that the manifest does not list: leftovers of
    interrupted builds or of builds with another world size."""
    for path in [*root.glob("shard-r*-*.safetensors*"), *root.glob(".shard-r*-*.tmp*"), *root.glob(f".{MANIFEST}.tmp*")]:
        if path.name.removesuffix(".json") not in listed:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Loading batches
# ---------------------------------------------------------------------------------------------
class CacheLoader:
    """Batches from a LatentCache, gathered whole from the memory maps and prefetched by background threads.

    Yields dict[str, Tensor] (name -> (B, *shape)), or (fields, images (B, 3, H, W)) when built
    with an image dataset (`LatentCache.paired_loader`), where items >= len(dataset) are the
    flipped images.

    Order: batch b of epoch e holds items indices(e)[b*B:(b+1)*B] in ascending order (order within a
    batch does not matter to a mean loss, and ascending reads are fastest); epoch e uses permutation `np.random.default_rng([seed, e])` of all items (identity
    without shuffle). Under torch.distributed (or with explicit rank/world_size) rank r takes
    every world_size-th index of it, so ranks never overlap and all get len(self) batches (the
    tail is dropped with drop_last, else padded by wrapping around, as DistributedSampler does).
    Each full pass over the loader advances the epoch, which starts at `epoch_offset`;
    `set_epoch(e, start_batch)` jumps anywhere, so a run resumed at global step s calls
    `set_epoch(epoch_offset + s // len(loader), s % len(loader))` and sees the same batches.

    `num_workers` gather threads (at least one) run up to `prefetch` batches ahead of the consumer,
    refilled in bulk whenever half of them have been taken;
    the gathers spend little time holding the GIL (one np.take per shard and field, widening in
    torch), so the training step does not wait. `pin_memory=True` pins batches (CUDA builds) for non_blocking host-to-device copies.
    """

    def __init__(self, cache: LatentCache, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, num_workers: int = 0, epoch_offset: int = 0,
                 image_dataset: Dataset | None = None, prefetch: int = 8, pin_memory: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if batch_size < 1 or prefetch < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1, prefetch >= 1, num_workers >= 0; got {batch_size}, {prefetch}, {num_workers}")
        if image_dataset is not None:
            _check_paired(cache, image_dataset)
        dist_rank, dist_world = _dist_rank_world()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.cache, self.batch_size, self.shuffle, self.seed, self.drop_last = cache, batch_size, shuffle, seed, drop_last
        self.num_threads, self.prefetch = max(1, num_workers), prefetch
        self._pin = pin_memory and torch.cuda.is_available()  # pinning needs a CUDA build and device
        self.images = _FlipView(image_dataset, cache.manifest["flip"]) if image_dataset is not None else None
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
        return order[self.rank::w]

    def _load(self, idx: np.ndarray) -> Any:
        idx = np.sort(idx)  # order within a batch does not matter to training; ascending gathers fastest
        fields = self.cache.gather(idx)
        if self._pin:
            fields = {name: t.pin_memory() for name, t in fields.items()}
        if self.images is None:
            return fields
        images = self.images.__getitems__(idx.tolist())[0]
        return fields, images.pin_memory() if self._pin else images

    def __iter__(self) -> Iterator[Any]:
        epoch, first = self.epoch, self.start_batch
        idx, bs = self.indices(epoch), self.batch_size
        todo = iter(range(first, len(self)))
        pool = ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="fastdae-cache")
        ahead: deque[Future] = deque()

        def refill() -> None:
            for b in itertools.islice(todo, self.prefetch - len(ahead)):
                ahead.append(pool.submit(self._load, idx[b * bs:(b + 1) * bs]))

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


def _check_paired(cache: LatentCache, image_dataset: Dataset) -> None:
    want = len(image_dataset) * (2 if cache.manifest["flip"] else 1)
    if want != len(cache):
        raise ValueError(f"image dataset of {len(image_dataset)} items does not match latent cache {cache.root} of "
                         f"{len(cache)} items (flip={cache.manifest['flip']})")


class PairedDataset(Dataset):
    """(fields, image) per index, for a torch DataLoader: the latents from the cache and the image
    from `image_dataset` (flipped for flip copies). `cache.paired_loader` is the faster batched path."""

    def __init__(self, cache: LatentCache, image_dataset: Dataset) -> None:
        _check_paired(cache, image_dataset)
        self.cache, self.images = cache, _FlipView(image_dataset, cache.manifest["flip"])

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor]:
        return self.cache[i], self.images[i][0]
