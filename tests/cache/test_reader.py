"""Reading a cache (fastdae.cache.reader, LatentCache): round trips of VQ-like and KL-like fields with
flip copies, corruption detected and named, and a shard truncated while mapped is a CacheError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdae.cache import CacheError, LatentCache
from fastdae.cache.writer import _smallest_int_dtype
from fastdae.data import ProceduralShapes, dataset_fingerprint
from tests.utils import (
    IndexImages,
    build,
    encode_kl,
    encode_vq,
    reseal,
    stats_reference,
)


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


# ---- a resealed manifest must still describe its shards ------------------------------------------
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
