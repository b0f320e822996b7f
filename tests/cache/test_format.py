"""The cache's on-disk format (fastdae.cache.format): the manifest carries its own checksum, every
schema problem is a CacheError naming the file and key, and shard dtypes promote in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdae.cache import CacheError, LatentCache
from tests.utils import (
    IndexImages,
    build,
    index_of,
    reseal,
)


def test_shard_dtypes_promote_in_the_manifest(tmp_path):
    """Each shard holds its own smallest dtype; the manifest gives their promotion; reads are int64."""

    def encode(x):
        i = index_of(x)
        value = torch.where(i < 16, i * 10, -i)  # shard 0: 0..150 (uint8), shard 1: -31..-16 (int8)
        return {"value": value}, x[:, :1, :1, :1]

    cache = build(tmp_path, IndexImages(32), encode)
    assert cache.manifest["fields"]["value"]["dtype"] == "int16"
    assert cache.gather(np.arange(32))["value"].tolist() == [i * 10 if i < 16 else -i for i in range(32)]


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
