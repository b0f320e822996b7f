"""Building a cache (fastdae.cache.writer): fields stored in logical order, integers downcast and floats
stored as float16, an interrupted build resumes, and a DDP build (2 CPU processes, gloo) equals one
process's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdae.cache import CacheError, LatentCache
from fastdae.cache.writer import _stored
from fastdae.data import ProceduralShapes
from tests.utils import (
    IndexImages,
    build,
    content,
    encode_index,
)


def test_strided_fields_are_stored_in_logical_order(tmp_path):
    """Fields may be views (KL's mean/logvar are channel halves of a channels-last map, as diffusers'
    encoders return on CPU): the shard holds their values, not their memory order."""
    ds = ProceduralShapes(8, size=16, seed=7)

    def encode(images):
        h = torch.randn(len(images), 8, 3, 3).contiguous(memory_format=torch.channels_last)
        mean, logvar = h.chunk(2, dim=1)  # non-contiguous views
        codes = torch.arange(len(images) * 6).reshape(len(images), 3, 2).transpose(1, 2)  # (B, 2, 3) view
        encode.fields.append((mean, logvar, codes))
        return {"mean": mean, "logvar": logvar, "codes": codes}, mean

    encode.fields = []
    cache = build(tmp_path, ds, encode, shard_size=8)
    mean, logvar, codes = encode.fields[0]
    got = cache.gather(np.arange(8))
    assert torch.equal(got["mean"], mean.half().float()) and torch.equal(got["logvar"], logvar.half().float())
    assert torch.equal(got["codes"], codes)


def test_integer_downcast_and_float_storage():
    cases = {
        (0, 255): np.uint8,
        (-1, 5): np.int8,
        (0, 300): np.int16,
        (0, 40000): np.uint16,
        (-1, 40000): np.int32,
        (0, 2**40): np.int64,
    }
    for (lo, hi), dtype in cases.items():
        a = _stored("f", torch.tensor([lo, hi], dtype=torch.int64))
        assert a.dtype == dtype and a.tolist() == [lo, hi]
    assert _stored("f", torch.tensor([0.5], dtype=torch.bfloat16)).dtype == np.float16
    with pytest.raises(ValueError, match="'big'.*float16"):
        _stored("big", torch.tensor([1e6]))
    with pytest.raises(TypeError, match="'mask'"):
        _stored("mask", torch.tensor([True]))


class CountingEncode:
    """encode_index that counts its calls and raises at call number `fail_at` (a killed build)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return encode_index(x)


def test_interrupted_build_resumes(tmp_path):
    ds = IndexImages(50)  # shards [0,16) [16,32) [32,48) [48,50) of 2, 2, 2, 1 batches of 8
    clean = build(tmp_path / "clean", ds)
    root = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build(root, ds, CountingEncode(fail_at=6))  # dies in shard 2's second batch
    assert not (root / "manifest.json").exists()
    with pytest.raises(CacheError, match="manifest.json does not exist"):
        LatentCache(root)
    assert sorted(p.name for p in root.glob("shard-*.safetensors")) == [
        "shard-r000-00000.safetensors",
        "shard-r000-00001.safetensors",
    ]
    # debris of a harder kill: a temp file mid-write and a shard renamed but without its sidecar
    (root / ".shard-r000-00002.safetensors.tmp999").write_bytes(b"half")
    (root / "shard-r000-00002.safetensors").write_bytes((root / "shard-r000-00000.safetensors").read_bytes())

    encode = CountingEncode()
    cache = build(root, ds, encode)
    assert encode.calls == 3 and cache.manifest["build"]["reused_shards"] == 2  # shards 2 and 3 only
    assert content(cache.manifest) == content(clean.manifest)
    assert torch.equal(cache.gather(np.arange(50))["value"], torch.arange(50))
    assert not list(root.glob(".*tmp*"))

    # a shard changed after its sidecar was written is encoded again; another encoder redoes all
    shard = root / "shard-r000-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x07")
    encode = CountingEncode()
    assert content(build(root, ds, encode).manifest) == content(clean.manifest) and encode.calls == 2
    encode = CountingEncode()
    assert build(root, ds, encode, encoder_sha256="enc2").manifest["encoder_sha256"] == "enc2"
    assert encode.calls == 7


def _ddp_build(rank: int, world: int, init_file: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cache = build(root, IndexImages(70), flip=True)
        assert len(cache) == 140
        # the loader shards indices across ranks: gather them all and check they are disjoint
        mine = torch.from_numpy(cache.loader(4, seed=1).indices(0))
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        assert len(set(torch.cat(everyone).tolist())) == 140
    finally:
        dist.destroy_process_group()


def test_ddp_build_matches_single_process(tmp_path):
    single = build(tmp_path / "single", IndexImages(70), flip=True)
    mp.spawn(_ddp_build, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = LatentCache(tmp_path / "ddp")
    assert content(ddp.manifest) == content(single.manifest)  # same shards, sha256s and channel stats
    files = [s["file"] for s in ddp.manifest["shards"]]
    assert files[0].startswith("shard-r000-") and files[-1].startswith("shard-r001-")
    assert ddp.manifest["build"]["world_size"] == 2
    values = ddp.gather(np.arange(140))["value"]
    assert torch.equal(values, torch.cat([torch.arange(70), torch.arange(70) + 1000]))
