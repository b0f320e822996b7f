"""Writing a latent cache: one pass of the frozen encoder over the dataset (`build`), shards written
atomically with sidecars so an interrupted build resumes, per-channel statistics merged exactly,
and the manifest written last (with its checksum) by rank 0."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from fastdae import files
from fastdae.cache.format import (
    FORMAT_VERSION,
    INT_DTYPES,
    LABEL,
    MANIFEST,
    SHARD_PATTERN,
    STORED_FLOAT,
    CacheError,
    IndexSpace,
    checksum,
    index_space,
    no_collate,
    shard_name,
)

if TYPE_CHECKING:
    from fastdae.data import MapDataset

EncodeFn = Callable[[Tensor], tuple[dict[str, Tensor], Tensor]]


def _smallest_int_dtype(lo: int, hi: int) -> np.dtype:
    return next(d for d in INT_DTYPES if np.iinfo(d).min <= lo and hi <= np.iinfo(d).max)


def _stored(name: str, t: Tensor) -> np.ndarray:
    """A field's values as stored: integers downcast to the smallest dtype that fits, floats as float16."""
    if t.dtype.is_floating_point:
        with np.errstate(over="ignore"):  # overflow to inf is reported just below, with the field's name
            a = np.ascontiguousarray(t.float().numpy(), dtype=STORED_FLOAT)
        if not np.isfinite(a).all():
            raise ValueError(f"field {name!r} has non-finite values or exceeds the float16 range (|x| > 65504)")
        return a
    if t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        a = t.numpy()
        dtype = _smallest_int_dtype(int(a.min()), int(a.max())) if a.size else np.uint8
        return np.ascontiguousarray(a, dtype=dtype)
    raise TypeError(f"field {name!r} must be an integer or floating tensor, got {t.dtype}")


@dataclass
class _Moments:
    """Per-channel count, mean and M2 = sum (x - mean)^2 in float64, merged with the exact parallel
    formulas of Chan et al. (1979): n = na + nb, d = mb - ma, mean = ma + d nb / n,
    M2 = M2a + M2b + d^2 na nb / n. Merging in a fixed order makes the result independent of how
    the items were split over ranks."""

    n: int
    mean: np.ndarray  # (C,)
    m2: np.ndarray  # (C,)

    @classmethod
    def empty(cls) -> _Moments:
        """No items yet (n = 0): merging it with other moments gives those."""
        return cls(0, np.zeros(0), np.zeros(0))

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


def _check_encoded(out: Any, batch: int) -> tuple[dict[str, Tensor], Tensor]:
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], dict) and isinstance(out[1], Tensor)):
        raise TypeError("encode must return (fields: dict[str, Tensor], stats_latent: Tensor)")
    fields, latent = out
    if LABEL in fields:
        raise ValueError(
            f"encode must not return a field named {LABEL!r}: the cache stores the dataset's labels under it"
        )
    for name, t in fields.items():
        if not isinstance(t, Tensor) or t.ndim < 1 or t.shape[0] != batch:
            raise ValueError(
                f"encode field {name!r} must be a tensor (B={batch}, ...), got {getattr(t, 'shape', type(t).__name__)}"
            )
    if latent.ndim != 4 or latent.shape[0] != batch or not latent.dtype.is_floating_point:
        raise ValueError(
            f"stats_latent must be a float tensor (B={batch}, C, h, w), got {latent.dtype} {tuple(latent.shape)}"
        )
    return {name: t.detach().cpu() for name, t in fields.items()}, latent.detach().cpu()


def _write_shard(
    root: Path,
    rank: int,
    k: int,
    start: int,
    stop: int,
    parts: dict[str, list[Tensor]],
    moments: _Moments,
    identity: dict[str, Any],
) -> dict[str, Any]:
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
    data = save(
        arrays, metadata={"fastdae": json.dumps({"format_version": FORMAT_VERSION, "start": start, "stop": stop})}
    )
    name = shard_name(rank, k)
    files.write_bytes(root / name, data)
    record = {
        "shard": k,
        "file": name,
        "start": start,
        "stop": stop,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "fields": {f: {"dtype": a.dtype.name, "shape": list(a.shape[1:])} for f, a in arrays.items()},
        "moments": moments.to_dict(),
        "identity": identity,
    }
    # the sidecar is written after the shard: a shard without one (killed in between) is re-encoded
    files.write_bytes(root / f"{name}.json", json.dumps(record).encode())
    return record


def _check_same_identity(identity: dict[str, Any], world: int) -> None:
    """Every rank must build the same cache: a rank with another encoder or dataset fingerprint (e.g. a
    node reading its own copy of the data) would write shards that rank 0's manifest then vouches for."""
    seen: list[Any] = [None] * world
    torch.distributed.all_gather_object(seen, identity)
    for r, other in enumerate(seen):
        keys = sorted(k for k in identity if other.get(k) != seen[0].get(k))
        if keys:  # every rank compares the same gathered list: all raise together, none waits at a barrier
            raise CacheError(
                f"rank {r} would build the cache with another {', '.join(keys)} than rank 0 "
                f"({', '.join(f'{other[k]!r} vs {seen[0][k]!r}' for k in keys)}); every rank must read the "
                f"same encoder file and dataset (shared storage)"
            )


def _reusable_shards(root: Path, identity: dict[str, Any], wanted: range) -> dict[int, dict[str, Any]]:
    """Shards of an earlier, interrupted build of the same cache: sidecar identity and range match,
    and the file's size and sha256 match the sidecar. Any rank's file for shard k will do, so a
    build resumed with another world size still reuses them."""
    found: dict[int, dict[str, Any]] = {}
    for sidecar in sorted(root.glob("shard-r*-*.safetensors.json")):
        try:
            record = json.loads(sidecar.read_text())
            k, path = int(record["shard"]), root / record["file"]
            ok = (
                SHARD_PATTERN.fullmatch(record["file"]) is not None
                and record["identity"] == identity
                and k in wanted
                and k not in found
                and path.is_file()
                and path.stat().st_size == record["bytes"]
                and files.sha256_file(path) == record["sha256"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable or foreign sidecar: the shard is encoded again
        if ok:
            found[k] = record
    return found


def _merge_manifest(
    records: list[dict[str, Any]], identity: dict[str, Any], dataset_len: int, seconds: float, encoded: int, world: int
) -> dict[str, Any]:
    records = sorted(records, key=lambda r: r["shard"])
    fields: dict[str, dict[str, Any]] = {}
    for r in records:
        if set(r["fields"]) != set(records[0]["fields"]):
            raise ValueError(
                f"encode returned fields {sorted(r['fields'])} for shard {r['shard']} but "
                f"{sorted(records[0]['fields'])} for shard {records[0]['shard']}"
            )
        for name, spec in r["fields"].items():
            prev = fields.setdefault(name, dict(spec))
            if prev["shape"] != spec["shape"]:
                raise ValueError(
                    f"field {name!r} has per-item shape {spec['shape']} in shard {r['shard']}, "
                    f"{prev['shape']} elsewhere"
                )
            prev["dtype"] = np.result_type(np.dtype(prev["dtype"]), np.dtype(spec["dtype"])).name
    moments = _Moments.empty()
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
        "build": {
            "seconds": seconds,
            "encoded": encoded,
            "latents_per_second": encoded / max(seconds, 1e-9),
            "reused_shards": sum(not r.get("encoded", False) for r in records),
            "world_size": world,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }


def _remove_unlisted(root: Path, listed: set[str]) -> None:
    """Delete shards (and sidecars, temp files) that the manifest does not list: leftovers of
    interrupted builds or of builds with another world size."""
    for path in [
        *root.glob("shard-r*-*.safetensors*"),
        *root.glob(".shard-r*-*.tmp*"),
        *root.glob(f".{MANIFEST}.tmp*"),
    ]:
        if path.name.removesuffix(".json") not in listed:
            path.unlink(missing_ok=True)


def build(
    root: str | Path,
    dataset: MapDataset | IndexSpace,
    encode: EncodeFn,
    *,
    batch_size: int = 256,
    shard_size: int = 4096,
    encoder_sha256: str,
    dataset_fingerprint: str,
    flip: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> None:
    """Encode every item of `dataset` (and flipped copies with flip=True) once and write the cache.
    `dataset` may already be in the cache's index space, with the same flip (format.IndexSpace: the
    image cache of fastdae.cache.images, whose images are the dataset's, decoded once).

    `encode(images (B, 3, H, W) float) -> (fields, stats_latent)` is called under torch.no_grad;
    fields map names to (B, ...) tensors to store (e.g. VQ {"indices": (B, h, w) int64}, KL
    {"mean", "logvar": (B, C, h, w)}); stats_latent (B, C, h, w) gives the per-channel mean/std.
    Batches never straddle a shard, so shard contents do not depend on the number of ranks.

    Under torch.distributed every rank calls this with the same arguments and encodes its own
    contiguous block of shards; rank 0 writes the manifest after all ranks have finished.
    Resuming: shards from an interrupted build with the same encoder, dataset, flip, shard_size and
    count whose sha256 matches their sidecar are kept; everything else is encoded again.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    view = index_space(dataset, flip)
    if view.n == 0:
        raise ValueError("cannot build a latent cache of an empty dataset")
    t0 = time.perf_counter()
    root = Path(root)
    rank, world = files.dist_rank_world()
    count = len(view)
    identity = {
        "format_version": FORMAT_VERSION,
        "encoder_sha256": encoder_sha256,
        "dataset_fingerprint": dataset_fingerprint,
        "flip": bool(flip),
        "shard_size": shard_size,
        "count": count,
    }
    if world > 1:
        _check_same_identity(identity, world)
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
    batches = [
        list(range(a, min(a + batch_size, stop)))
        for start, stop in ranges.values()
        for a in range(start, stop, batch_size)
    ]
    loader: Iterator[tuple[Tensor, Tensor]] = iter(
        DataLoader(view, batch_sampler=batches, num_workers=num_workers, collate_fn=no_collate) if batches else ()
    )

    from tqdm import tqdm

    bar = tqdm(
        total=sum(stop - start for start, stop in ranges.values()),
        unit="latent",
        unit_scale=True,
        desc=f"latent cache (rank {rank})" if world > 1 else "latent cache",
        disable=not progress or rank != 0,
    )
    with torch.no_grad(), bar:
        for k, (start, stop) in ranges.items():
            parts: dict[str, list[Tensor]] = {}
            moments = _Moments.empty()
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
        manifest = _merge_manifest(mine_records, identity, view.n, time.perf_counter() - t0, encoded, world)
        files.write_bytes(root / MANIFEST, json.dumps({**manifest, "checksum": checksum(manifest)}, indent=1).encode())
        _remove_unlisted(root, {s["file"] for s in manifest["shards"]})
    if world > 1:
        torch.distributed.barrier()
