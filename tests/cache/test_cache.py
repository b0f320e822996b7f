"""LatentCache: round trips (VQ-like and KL-like fields, flip copies), integer downcasting, resume of
an interrupted build, corruption detection, DDP shards on CPU, and the batched prefetching loader."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import Dataset

from fastdae.cache import CacheError, LatentCache, PairedDataset
from fastdae.cache.writer import _smallest_int_dtype, _stored
from fastdae.data import ProceduralShapes, dataset_fingerprint

# a fixed "encoder": 4x4 average pool, a 3 -> 4 channel mix, and a 300-code codebook (so indices need int16)
_GEN = torch.Generator().manual_seed(1234)
MIX = torch.randn(4, 3, generator=_GEN)
CODEBOOK = torch.randn(300, 4, generator=_GEN)


def encode_latent(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", MIX, F.avg_pool2d(x, 4))  # (B, 4, H/4, W/4)


def encode_vq(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    z = encode_latent(x).permute(0, 2, 3, 1)  # (B, h, w, 4)
    indices = torch.cdist(z.reshape(len(x), -1, 4), CODEBOOK[None].expand(len(x), -1, -1)).argmin(-1)
    indices = indices.reshape(z.shape[:3])  # (B, h, w) int64
    return {"indices": indices}, CODEBOOK[indices].permute(0, 3, 1, 2)


def encode_kl(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    mean = encode_latent(x)
    return {"mean": mean, "logvar": -mean.abs() - 1}, mean


class IndexImages(Dataset):
    """Tiny (3, 4, 4) images whose pixels encode their index, so an encode fn can recover it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.full((3, 4, 4), i / 1000.0)
        image[:, :, 0] = -1.0  # the left column tells flipped copies apart
        return image, torch.tensor(i % 3)


def index_of(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x[:, 0, 0, 1:3].mean(-1) * 1000).long()  # (B,) columns 1, 2 in either orientation


def encode_index(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """value = index (+1000 for flipped images); stats latent (B, 2, 1, 2) from the pixels."""
    value = index_of(x) + 1000 * (x[:, 0, 0, -1] == -1).long()
    return {"value": value}, x[:, :2, :1, :2].clone()


def build(root, dataset, encode=encode_index, **kw) -> LatentCache:
    kw = {
        "batch_size": 8,
        "shard_size": 16,
        "encoder_sha256": "enc",
        "dataset_fingerprint": "data",
        "progress": False,
        **kw,
    }
    return LatentCache.build(root, dataset, encode, **kw)


def content(manifest: dict) -> dict:
    """A manifest without what legitimately differs between builds: file names, timings (and so its checksum)."""
    m = {k: v for k, v in manifest.items() if k not in ("build", "checksum")}
    m["shards"] = [{k: v for k, v in s.items() if k != "file"} for s in m["shards"]]
    return m


def stats_reference(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = latents.double().transpose(0, 1).reshape(latents.shape[1], -1)  # (C, N h w)
    return x.mean(1), x.std(1, unbiased=False)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------
def test_round_trip_vq(tmp_path):
    ds = ProceduralShapes(40, size=16, seed=5)
    cache = build(tmp_path, ds, encode_vq, dataset_fingerprint=dataset_fingerprint(ds))
    images, labels = ds.images(np.arange(40))
    fields, latents = encode_vq(images)
    assert len(cache) == 40 and [(s["start"], s["stop"]) for s in cache.manifest["shards"]] == [
        (0, 16),
        (16, 32),
        (32, 40),
    ]
    stored = cache.manifest["fields"]["indices"]["dtype"]
    assert stored == _smallest_int_dtype(int(fields["indices"].min()), int(fields["indices"].max())).name
    assert cache.fields["indices"] == (getattr(torch, stored), (4, 4)) and cache.fields["label"][1] == ()
    for verify in ("open", "lazy"):
        reopened = LatentCache(tmp_path, verify=verify)
        everything = reopened.gather(np.arange(40))
        assert everything["indices"].dtype == torch.int64 and torch.equal(everything["indices"], fields["indices"])
        assert torch.equal(everything["label"], labels)
        assert torch.equal(reopened[-1]["indices"], fields["indices"][39])
        shuffled = [33, 2, 17, 2, 0, 39, 16]  # any order, repeats, several shards
        assert torch.equal(reopened.gather(shuffled)["indices"], fields["indices"][shuffled])
    mean, std = stats_reference(latents)
    assert torch.allclose(cache.channel_mean.double(), mean, atol=1e-6)
    assert torch.allclose(cache.channel_std.double(), std, atol=1e-6)
    cache.check(encoder_sha256="enc", dataset_fingerprint=dataset_fingerprint(ds))
    with pytest.raises(CacheError, match="encoder_sha256"):
        cache.check(encoder_sha256="other")
    with pytest.raises(IndexError):
        cache[40]


def test_round_trip_kl_with_flips(tmp_path):
    ds = ProceduralShapes(20, size=16, seed=6)
    cache = build(tmp_path, ds, encode_kl, flip=True, shard_size=12, num_workers=1)
    images, labels = ds.images(np.arange(20))
    both = torch.cat([images, images.flip(-1)])  # items 20..39 are the flips of 0..19
    fields, latents = encode_kl(both)
    assert len(cache) == 40 and cache.manifest["flip"] and cache.dataset_len == 20
    assert cache.fields["mean"] == (torch.float16, (4, 4, 4))
    got = cache.gather(np.arange(40))
    for name in ("mean", "logvar"):
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], fields[name].half().float())
    assert torch.equal(got["label"], torch.cat([labels, labels]))
    mean, std = stats_reference(latents)
    assert torch.allclose(cache.channel_mean.double(), mean, atol=1e-6)
    assert torch.allclose(cache.channel_std.double(), std, atol=1e-6)


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


def test_shard_dtypes_promote_in_the_manifest(tmp_path):
    """Each shard holds its own smallest dtype; the manifest gives their promotion; reads are int64."""

    def encode(x):
        i = index_of(x)
        value = torch.where(i < 16, i * 10, -i)  # shard 0: 0..150 (uint8), shard 1: -31..-16 (int8)
        return {"value": value}, x[:, :1, :1, :1]

    cache = build(tmp_path, IndexImages(32), encode)
    assert cache.manifest["fields"]["value"]["dtype"] == "int16"
    assert cache.gather(np.arange(32))["value"].tolist() == [i * 10 if i < 16 else -i for i in range(32)]


# ---------------------------------------------------------------------------------------------
# Interrupted builds and corruption
# ---------------------------------------------------------------------------------------------
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


def test_corruption_is_detected_and_named(tmp_path):
    build(tmp_path, IndexImages(40))
    shard = tmp_path / "shard-r000-00001.safetensors"
    good = shard.read_bytes()

    shard.write_bytes(good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:])  # flip a byte of the data
    with pytest.raises(CacheError, match="shard-r000-00001.safetensors is corrupted"):
        LatentCache(tmp_path)
    lazy = LatentCache(tmp_path, verify="lazy")
    assert lazy[0]["value"] == 0  # shard 0 is fine; shard 1 fails on first touch
    with pytest.raises(CacheError, match="shard-r000-00001.safetensors is corrupted"):
        lazy[20]

    shard.write_bytes(good[:-8])
    for verify in ("open", "lazy"):
        with pytest.raises(CacheError, match="shard-r000-00001.safetensors is .* bytes.*truncated"):
            LatentCache(tmp_path, verify=verify)
    shard.unlink()
    with pytest.raises(CacheError, match="shard-r000-00001.safetensors is missing"):
        LatentCache(tmp_path)
    shard.write_bytes(good)
    LatentCache(tmp_path)

    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fields"]["value"]["shape"] = [2]
    manifest_path.write_text(reseal(manifest))  # a consistent manifest that does not fit the shards
    with pytest.raises(CacheError, match="shard-r000-00000.safetensors: field 'value'"):
        LatentCache(tmp_path)
    manifest_path.write_text("{")
    with pytest.raises(CacheError, match="manifest.json is not valid JSON"):
        LatentCache(tmp_path)


def reseal(manifest: dict) -> str:
    """A manifest's text with its checksum recomputed: sha256 of the body (every key but "checksum")
    as compact JSON with sorted keys."""
    import hashlib

    body = {k: v for k, v in manifest.items() if k != "checksum"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return json.dumps({**body, "checksum": digest})


def test_manifest_carries_its_own_checksum(tmp_path):
    build(tmp_path, IndexImages(40))
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["channel_mean"][0] += 1.0  # the statistics the prior scales its latents by
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="manifest.json.*checksum"):
        LatentCache(tmp_path)
    manifest["channel_mean"][0] -= 1.0
    manifest["build"]["seconds"] = 1e6
    path.write_text(reseal(manifest))  # a consistent manifest is read (the reseal helper is the format)
    assert LatentCache(tmp_path).manifest["build"]["seconds"] == 1e6


# ---- issue 23: a resealed manifest must still describe its shards -----------------------------------
def test_resealed_channel_statistics_that_are_not_the_shards_are_refused(tmp_path):
    """channel_mean + 100 with a recomputed checksum trained the prior to a loss of 1.4e7: the manifest's
    statistics are compared with the moments each shard's sidecar recorded."""
    build(tmp_path, IndexImages(40))
    path = tmp_path / "manifest.json"
    good = json.loads(path.read_text())
    for key, delta in (("channel_mean", 100.0), ("channel_std", 1e-3)):
        edited = json.loads(json.dumps(good))
        edited[key][1] += delta
        path.write_text(reseal(edited))
        for verify in ("open", "lazy"):
            with pytest.raises(CacheError, match=rf"manifest\.json: {key} .* is not the statistics.*rebuild"):
                LatentCache(tmp_path, verify=verify)
    path.write_text(reseal(good))
    assert LatentCache(tmp_path).channel_mean.tolist() == pytest.approx(good["channel_mean"])


def test_swapped_shard_records_are_refused_not_served_in_another_order(tmp_path):
    """Two records' files (with their sizes and sha256) swapped, the ranges kept and the checksum
    recomputed: every file verifies, but the shard's own header says which items it holds."""
    build(tmp_path, IndexImages(40))
    path = tmp_path / "manifest.json"
    m = json.loads(path.read_text())
    a, b = m["shards"][0], m["shards"][1]
    for key in ("file", "bytes", "sha256"):
        a[key], b[key] = b[key], a[key]
    path.write_text(reseal(m))
    for verify in ("open", "lazy"):
        with pytest.raises(CacheError, match=r"shard-r000-00001\.safetensors holds items \(16, 32\), the manifest "):
            LatentCache(tmp_path, verify=verify)


def test_a_deeply_nested_manifest_is_a_cache_error(tmp_path):
    build(tmp_path, IndexImages(40))
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CacheError, match=r"manifest\.json is not valid JSON: RecursionError"):
        LatentCache(tmp_path)


def _edit(manifest: dict, edit: str, root: Path) -> object:
    m = json.loads(json.dumps(manifest))
    if edit == "list":
        return []
    if edit == "no shards":
        del m["shards"]
    elif edit == "shards not a list":
        m["shards"] = {"file": "x"}
    elif edit == "bad dtype":
        m["fields"]["value"]["dtype"] = "int7"
    elif edit == "bad shape":
        m["fields"]["value"]["shape"] = "scalar"
    elif edit == "absolute file":
        m["shards"][0]["file"] = str(root.resolve() / m["shards"][0]["file"])
    elif edit == "file outside":
        m["shards"][0]["file"] = "../" + m["shards"][0]["file"]
    elif edit == "foreign name":
        m["shards"][0]["file"] = "manifest.json"
    elif edit == "string count":
        m["count"] = "40"
    elif edit == "stats length":
        m["channel_std"] = m["channel_std"][:1]
    return m


@pytest.mark.parametrize(
    "edit,match",
    [
        ("list", "a JSON object"),
        ("no shards", "'shards'"),
        ("shards not a list", "'shards'"),
        ("bad dtype", "dtype"),
        ("bad shape", "shape"),
        ("absolute file", "shard file name"),
        ("file outside", "shard file name"),
        ("foreign name", "shard file name"),
        ("string count", "'count'"),
        ("stats length", "channel_std"),
    ],
)
def test_every_manifest_schema_problem_is_a_cache_error_naming_the_file(tmp_path, edit, match):
    build(tmp_path / "c", IndexImages(40))
    path = tmp_path / "c" / "manifest.json"
    edited = _edit(json.loads(path.read_text()), edit, tmp_path / "c")
    path.write_text(reseal(edited) if isinstance(edited, dict) else json.dumps(edited))
    with pytest.raises(CacheError, match=rf"manifest\.json.*{match}"):
        LatentCache(tmp_path / "c", verify="lazy")


TRUNCATE_SCRIPT = """
import sys
import numpy as np
from pathlib import Path
from fastdae.cache import CacheError, LatentCache

cache = LatentCache(sys.argv[1])
cache.gather(np.arange(len(cache)))  # every shard mapped
shard = Path(sys.argv[1]) / cache.manifest["shards"][0]["file"]
with open(shard, "r+b") as f:
    f.truncate(4096)
try:
    cache.gather(np.arange(len(cache)))
except CacheError as e:
    print("CacheError:", e)
"""


def test_a_shard_truncated_while_mapped_is_a_cache_error_not_a_bus_error(tmp_path):
    import os
    import subprocess
    import sys

    build(tmp_path, IndexImages(4000), encode=encode_kl, shard_size=4000, batch_size=500)  # one 800 KB shard
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-c", TRUNCATE_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    assert "CacheError:" in proc.stdout and "truncated" in proc.stdout


# ---------------------------------------------------------------------------------------------
# torch.distributed: 2 CPU processes with gloo
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
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
    paired = PairedDataset(cache, ds)
    item_fields, image = paired[15]
    assert len(paired) == 24 and torch.equal(image, images[15])
    assert torch.equal(item_fields["mean"], fields["mean"][15].half().float())
    with pytest.raises(ValueError, match="does not match latent cache"):
        PairedDataset(cache, ProceduralShapes(13, size=16))
