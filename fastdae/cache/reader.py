"""Reading a latent cache: the manifest (checked by format.read_manifest), shards memory-mapped after
their size and sha256 are verified, and `gather` of any batch of items straight from the maps."""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from fastdae import files
from fastdae.cache.format import MANIFEST, SAFETENSORS_DTYPES, TORCH_READ, CacheError, IndexSpace, read_manifest

if TYPE_CHECKING:
    from fastdae.cache.writer import EncodeFn
    from fastdae.data import MapDataset

MAX_HEADER = 100_000_000  # safetensors' own limit on a header's length


class _Shard:
    """One shard file: size checked on open; sha256 verified and arrays memory-mapped on first use;
    the size checked again (fstat of the open file) before every read, so a shard truncated while
    mapped is a CacheError, not a SIGBUS (a truncation racing the read itself cannot be caught)."""

    def __init__(self, path: Path, record: dict[str, Any], fields: dict[str, dict[str, Any]]) -> None:
        self.path, self.record, self.fields = path, record, fields
        self.start, self.stop = int(record["start"]), int(record["stop"])
        self._arrays: dict[str, np.ndarray] | None = None
        self._file: Any = None  # kept open: fstat sees the mapped file even if the path is replaced
        self._lock = threading.Lock()
        self.verified = False  # set when another process of this run checked the sha256 (LatentCache.trust)

    def check_size(self) -> None:
        if not self.path.is_file():
            raise CacheError(f"cache shard {self.path} is missing")
        size = self.path.stat().st_size
        if size != self.record["bytes"]:
            raise CacheError(
                f"cache shard {self.path} is {size} bytes, the manifest says {self.record['bytes']} "
                f"(truncated or overwritten); rebuild the cache"
            )

    def check_range(self) -> None:
        """The item range the shard's own header records (the writer's "fastdae" metadata) must be the
        manifest's: records whose files were swapped would otherwise serve items in another order."""
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > MAX_HEADER:
                    raise ValueError(f"header length {header_len}")
                header = json.loads(f.read(header_len))
            meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
            own = json.loads(meta["fastdae"]) if isinstance(meta, dict) and "fastdae" in meta else None
        except (OSError, struct.error, ValueError, RecursionError, TypeError) as e:
            raise CacheError(f"cache shard {self.path} has no valid safetensors header: {e}") from None
        if own is None:
            return  # written without the metadata: the sha256 in the manifest is all there is
        mine = (own.get("start"), own.get("stop")) if isinstance(own, dict) else None
        if mine != (self.start, self.stop):
            raise CacheError(
                f"cache shard {self.path} holds items {mine}, the manifest lists it for "
                f"[{self.start}, {self.stop}) (its shard records were edited or swapped); rebuild the cache"
            )

    def arrays(self) -> dict[str, np.ndarray]:
        """The mapped fields, after checking that the file still has all its bytes."""
        arrays = self._arrays if self._arrays is not None else self.open()
        size = os.fstat(self._file.fileno()).st_size
        if size < self.record["bytes"]:
            raise CacheError(
                f"cache shard {self.path} was truncated to {size} bytes while in use (the manifest says "
                f"{self.record['bytes']}); rebuild the cache"
            )
        return arrays

    def open(self) -> dict[str, np.ndarray]:
        """Verify the file (size, sha256, header against the manifest) and memory-map its fields."""
        with self._lock:  # loader threads may touch a lazily verified shard at the same time
            if self._arrays is None:
                self._arrays = self._map()
        return self._arrays

    def _map(self) -> dict[str, np.ndarray]:
        self.check_size()
        if not self.verified and files.sha256_file(self.path) != self.record["sha256"]:
            raise CacheError(f"cache shard {self.path} is corrupted: its sha256 does not match the manifest")
        self._file = open(self.path, "rb")
        raw = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            (header_len,) = struct.unpack_from("<Q", raw, 0)
            header = json.loads(raw[8 : 8 + header_len])
        except (struct.error, ValueError) as e:
            raise CacheError(f"cache shard {self.path} has no valid safetensors header: {e}") from e
        base, n, arrays = 8 + header_len, self.stop - self.start, {}
        for name, spec in self.fields.items():
            entry = header.get(name)
            stored = np.dtype(SAFETENSORS_DTYPES.get(entry["dtype"], np.void) if entry else np.void)  # void: refused
            shape = (n, *spec["shape"])
            if (
                entry is None
                or tuple(entry["shape"]) != shape
                or not np.can_cast(stored, np.dtype(spec["dtype"]), "safe")
            ):
                raise CacheError(
                    f"cache shard {self.path}: field {name!r} is {entry and (entry['dtype'], entry['shape'])}, "
                    f"the manifest says {spec['dtype']} {list(shape)}"
                )
            lo, hi = entry["data_offsets"]
            if not 0 <= lo <= hi <= len(raw) - base:
                raise CacheError(f"cache shard {self.path}: field {name!r} lies outside the file")
            # plain ndarrays over the map (np.memmap's subclass hooks cost more than the copy itself)
            arrays[name] = np.frombuffer(
                raw, dtype=stored.newbyteorder("<"), count=(hi - lo) // stored.itemsize, offset=base + lo
            ).reshape(shape)
        return arrays

    def __getstate__(self) -> dict[str, Any]:
        # maps and locks do not pickle (a DataLoader worker re-opens the file)
        return {"path": self.path, "record": self.record, "fields": self.fields}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # mypy refuses __init__ on an instance (a subclass's could take other arguments); _Shard has no subclass
        self.__init__(state["path"], state["record"], state["fields"])  # type: ignore[misc]


class LatentCache:
    """A latent cache on disk (see fastdae.cache), memory-mapped.

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
            raise CacheError(
                f"no latent cache at {self.root}: {path} does not exist (build it first, "
                f"or an interrupted build has not finished)"
            )
        self.manifest: dict[str, Any] = read_manifest(path)
        m = self.manifest
        self.fields: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            name: (getattr(torch, spec["dtype"]), tuple(spec["shape"])) for name, spec in m["fields"].items()
        }
        self._shards = [_Shard(self.root / s["file"], s, m["fields"]) for s in m["shards"]]
        ends = [0] + [s.stop for s in self._shards]
        if [s.start for s in self._shards] != ends[:-1] or ends[-1] != m["count"]:
            raise CacheError(f"{path}: shard ranges do not tile [0, {m['count']})")
        self._starts = np.array(ends[:-1], dtype=np.int64)
        for shard in self._shards:
            shard.check_size()
            shard.check_range()
        self._check_channel_stats(path)
        self.channel_mean = torch.tensor(m["channel_mean"], dtype=torch.float32)  # (C,)
        self.channel_std = torch.tensor(m["channel_std"], dtype=torch.float32)  # (C,)
        # the shard files are named by the writer's pattern (read_manifest), so they lie in self.root
        if verify == "open":
            for shard in self._shards:
                shard.open()

    def _check_channel_stats(self, path: Path) -> None:
        """The manifest's per-channel statistics (what the prior scales latents by) must be those the
        shards' sidecars recorded, merged in shard order as the writer merged them: a manifest edited
        and given a new checksum (channel_mean + 100 trained the prior to a loss of 1e7) is refused.
        Checked when every listed shard still has its sidecar (the writer keeps them)."""
        from fastdae.cache.writer import _Moments

        moments = _Moments.empty()
        for shard in self._shards:
            sidecar = shard.path.with_name(shard.path.name + ".json")
            try:
                record = json.loads(sidecar.read_text())
                if record["sha256"] != shard.record["sha256"]:
                    return  # not this shard's sidecar: nothing to compare against
                moments = moments.merge(_Moments.from_dict(record["moments"]))
            except (OSError, ValueError, RecursionError, KeyError, TypeError):
                return
        if moments.n == 0:
            return  # no latents recorded: nothing to compare against
        m = self.manifest
        want = {"channel_mean": moments.mean, "channel_std": np.sqrt(moments.m2 / moments.n)}
        for key, value in want.items():
            got = np.asarray(m[key], dtype=np.float64)
            if got.shape != value.shape or not np.allclose(got, value, rtol=1e-9, atol=1e-12):
                raise CacheError(
                    f"{path}: {key} {m[key]} is not the statistics of the latents the shards hold "
                    f"({value.tolist()}, from their sidecars): the manifest or a sidecar was edited; rebuild the cache"
                )

    @classmethod
    def build(
        cls, root: str | os.PathLike, dataset: MapDataset | IndexSpace, encode: EncodeFn, **kwargs: Any
    ) -> LatentCache:
        """Encode every item of `dataset` once and write the cache (fastdae.cache.writer.build), then open it."""
        from fastdae.cache.writer import build

        build(Path(root), dataset, encode, **kwargs)
        return cls(root, verify="lazy")  # every shard was just hashed

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def verify(self, shards: list[int]) -> None:
        """Check (and map) these shards now: a CacheError names the first bad one."""
        for k in shards:
            self._shards[k].open()

    def trust(self, shards: list[int]) -> None:
        """Skip the sha256 of these shards on first read: another process of this run checked them
        (fastdae.cache.images.ImageCache.verify_split); sizes and headers are still checked."""
        for k in shards:
            self._shards[k].verified = True

    @property
    def dataset_len(self) -> int:
        """Items of the source dataset (len(self) is twice that with flip copies)."""
        return int(self.manifest["dataset_len"])

    def check(self, encoder_sha256: str | None = None, dataset_fingerprint: str | None = None) -> None:
        """Raise CacheError if the cache was built from another encoder checkpoint or dataset."""
        for key, want in (("encoder_sha256", encoder_sha256), ("dataset_fingerprint", dataset_fingerprint)):
            if want is not None and self.manifest[key] != want:
                raise CacheError(
                    f"latent cache {self.root} has {key} {self.manifest[key]}, expected {want}; rebuild it"
                )

    def gather(self, indices: np.ndarray | list[int], widen: bool = True) -> dict[str, Tensor]:
        """Fields of a batch of items, gathered straight from the memory maps: name -> (B, *shape).
        Ascending indices (as the loader passes them) are fastest: each shard's run of items is
        copied with one np.take per field into a contiguous slice of the batch. widen=False keeps
        the manifest's dtypes (the image cache's uint8 pixels: int64 would be 8x the bytes)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"cache index out of range [0, {len(self)})")
        order = np.argsort(idx, kind="stable")
        ascending = bool((order == np.arange(len(idx))).all())
        sidx = idx if ascending else idx[order]
        out = {
            name: np.empty((len(idx), *spec["shape"]), dtype=spec["dtype"])
            for name, spec in self.manifest["fields"].items()
        }
        shard_of = np.searchsorted(self._starts, sidx, side="right") - 1  # (B,) non-decreasing
        cuts = [0, *(np.flatnonzero(np.diff(shard_of)) + 1).tolist(), len(idx)]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            s = int(shard_of[a])
            local = sidx[a:b] - self._starts[s]
            for name, array in self._shards[s].arrays().items():
                dst = out[name][a:b]
                if array.dtype == dst.dtype:
                    np.take(array, local, axis=0, out=dst)  # no temporary
                else:
                    dst[...] = array[local]  # a shard stored narrower than the manifest's dtype
        # widen once per field (int64 / float32), in torch, which releases the GIL
        result = {
            name: torch.from_numpy(a).to(TORCH_READ[a.dtype.kind]) if widen else torch.from_numpy(a)
            for name, a in out.items()
        }
        if not ascending:
            inverse = torch.from_numpy(np.argsort(order))
            result = {name: t[inverse] for name, t in result.items()}
        return result

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"cache index {i} out of range [0, {len(self)})")
        return {name: t[0] for name, t in self.gather([i % len(self)]).items()}

    def loader(self, batch_size: int, **kwargs: Any) -> Any:
        """Batches of fields: CacheLoader(self, batch_size, **kwargs), whose keywords (shuffle, seed,
        drop_last, num_workers, epoch_offset, prefetch, pin_memory, rank, world_size) it documents."""
        from fastdae.cache.loader import CacheLoader

        return CacheLoader(self, batch_size, **kwargs)

    def paired_loader(self, image_dataset: MapDataset, batch_size: int, **kwargs: Any) -> Any:
        """Batches of (fields, images) with the same indices, for stage 2 (a loader with image_dataset)."""
        return self.loader(batch_size, image_dataset=image_dataset, **kwargs)
