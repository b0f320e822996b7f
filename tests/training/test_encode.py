"""The cache stage (fastdae.training.encode) with cache.images: the images are stored first and the
encoder reads them from there, so each dataset item is read once and the latents are the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import fastdae
from fastdae.cache.images import FOLDER
from fastdae.data import ProceduralShapes
from tests.utils import content, tiny


def latent_cache(root: Path) -> tuple[dict[str, bytes], dict]:
    """The shards and sidecars of the latent cache in `root`, and its manifest without build timings."""
    shards = {p.name: p.read_bytes() for p in sorted(root.glob("shard-*"))}
    return shards, content(json.loads((root / "manifest.json").read_text()))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("flip", [False, True])
def test_with_cache_images_each_item_is_read_once_and_the_latent_cache_is_unchanged(tmp_path, monkeypatch, flip):
    overrides = ("stage1.steps=2", f"cache.flip={str(flip).lower()}", "cache.shard_size=16")
    fastdae.train(tiny(tmp_path, *overrides, "stages=stage1,cache"))
    cache = tmp_path / "cache"
    plain = latent_cache(cache)
    shutil.rmtree(cache)

    reads: list[int] = []
    original = ProceduralShapes.__getitems__
    monkeypatch.setattr(ProceduralShapes, "__getitems__", lambda self, idx: reads.extend(idx) or original(self, idx))
    fastdae.train(tiny(tmp_path, *overrides, "cache.images=true", "stages=cache"))
    assert sorted(reads) == list(range(64))  # the tiny preset's 64 shapes, each rendered once
    assert (cache / FOLDER / "manifest.json").is_file()
    shards, manifest = latent_cache(cache)
    assert len(shards) == 2 * (8 if flip else 4) and shards == plain[0]  # 16 items a shard, with sidecars
    assert manifest == plain[1]
