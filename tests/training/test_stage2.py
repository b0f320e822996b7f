"""Stage 2 (fastdae.training.stage2) with the decoded-image cache: the same decoder, no image decoded."""

from __future__ import annotations

import json

import pytest

import fastdae
from fastdae.cache.images import FOLDER
from fastdae.data import ProceduralShapes
from tests.utils import tiny


@pytest.mark.usefixtures("one_thread")
def test_stage2_from_the_image_cache_trains_the_same_decoder_without_decoding(tmp_path, monkeypatch):
    overrides = ("stage1.steps=2", "stage2.steps=2", "cache.flip=true", "stages=stage1,cache,stage2")
    plain = fastdae.train(tiny(tmp_path / "plain", *overrides))
    # stage 2 must not render (decode) a single target image: the dataset is only read by the cache stage
    # and by the evaluation after training, which calls __getitem__
    cached_cfg = tiny(tmp_path / "cached", *overrides, "cache.images=true")
    fastdae.train({**cached_cfg.to_dict(), "stages": ["stage1", "cache"]})
    calls = []
    original = ProceduralShapes.__getitems__
    monkeypatch.setattr(ProceduralShapes, "__getitems__", lambda self, idx: calls.append(idx) or original(self, idx))
    cached = fastdae.train({**cached_cfg.to_dict(), "stages": ["stage2"]})
    assert calls == []

    images = tmp_path / "cached" / "cache" / FOLDER
    manifest = json.loads((images / "manifest.json").read_text())
    assert manifest["fields"]["image"] == {"dtype": "uint8", "shape": [3, 16, 16]}
    assert json.loads((tmp_path / "cached" / "cache" / "metrics.json").read_text())["images"]["reused"] is False
    assert not (tmp_path / "plain" / "cache" / FOLDER).exists()
    decoders = [r.checkpoints["stage2_decoder"].read_bytes() for r in (plain, cached)]
    assert decoders[0] == decoders[1]
