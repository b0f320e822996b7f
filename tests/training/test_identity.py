"""Each stage's identity (fastdae.training.identity): the config keys it depends on and the
fingerprints of its inputs. Resume refuses another config and names the key, may change the keys
that only say how to run (learning rates, steps), and refuses inputs that changed (other images)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fastdae
from fastdae.config import TrainConfig, apply_overrides
from tests.utils import STAGE1, read_log, tiny, tree

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- resume with another config ------------------------------------------------------------------
@pytest.mark.parametrize(
    "changed,key",
    [
        ("seed=1", "seed"),
        ("autoencoder.bottleneck=kl", "autoencoder.bottleneck"),
        ("stage1.grad_clip=0.5", "stage1.grad_clip"),
    ],
)
def test_resume_refuses_another_config_and_names_the_key(tmp_path, changed, key):
    cfg = tiny(tmp_path, *STAGE1)
    fastdae.train(cfg)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=rf"stage1.*{re.escape(key)}"):
        fastdae.train(apply_overrides(cfg, ["resume=true", changed]))
    assert tree(tmp_path) == before  # config.yaml, summary.json, checkpoints: all untouched


def test_resume_may_change_the_learning_rate_and_uses_it(tmp_path):
    cfg = tiny(tmp_path, *STAGE1)
    fastdae.train(cfg)
    fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.lr=1e-3", "stage1.log_every=2", "stage1.steps=4"]))
    assert TrainConfig.load(tmp_path / "config.yaml").stage1.lr == 1e-3
    state = torch.load(tmp_path / "stage1" / "ckpt-00000004" / "state.pt", weights_only=True)
    assert state["optimizers"]["autoencoder"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert state["schedulers"]["autoencoder"]["base_lrs"] == [pytest.approx(1e-3)]


def test_a_run_recorded_before_a_config_key_existed_resumes_at_its_default(tmp_path):
    """A config key added since a run was recorded (its identity lacks it) is unchanged at the key's
    default, which trains what the older code trained; any other value is refused, naming the key."""
    import json

    cfg = tiny(tmp_path, *STAGE1)
    fastdae.train(cfg)
    record = tmp_path / "stage1" / "identity.json"
    rec = json.loads(record.read_text())
    assert rec["config"].pop("stage1.chroma_weight") == 0.0
    record.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=r"stage1\.chroma_weight: \(absent\) -> 3\.0"):
        fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.chroma_weight=3", "stage1.steps=4"]))
    fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.steps=4"]))
    assert (tmp_path / "stage1" / "ckpt-00000004").is_dir()


# ---- steps on resume -----------------------------------------------------------------------------
def test_resume_with_more_steps_continues_and_matches_a_straight_run(tmp_path):
    straight = fastdae.train(tiny(tmp_path / "straight", *STAGE1, "stage1.steps=4"))
    cfg = tiny(tmp_path / "grown", *STAGE1)
    fastdae.train(cfg)
    grown = fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.steps=4"]))
    m = grown.metrics["stages"]["stage1"]
    assert m["steps"] == 4 and m["steps_this_run"] == 2 and m["images_per_s"] > 0
    want, got = (read_log(r.run_dir / "stage1" / "log.csv") for r in (straight, grown))
    assert [r["step"] for r in got] == ["1", "2", "3", "4"]
    for a, b in zip(want, got, strict=True):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5, abs=1e-7), a["step"]


def test_resume_with_fewer_steps_than_the_last_checkpoint_is_refused(tmp_path):
    cfg = tiny(tmp_path, *STAGE1, "stage1.steps=4")
    fastdae.train(cfg)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"stage1\.steps.*3.*last checkpoint.*4"):
        fastdae.train(apply_overrides(cfg, ["resume=true", "stage1.steps=3"]))
    assert tree(tmp_path) == before


# ---- a stage reading the cache checks the data it was built from ---------------------------------
def test_stage2_and_prior_refuse_a_cache_of_other_images(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 16, 16, 3), dtype=np.uint8)
    data = tmp_path / "images.npy"
    np.save(data, images)
    run = tmp_path / "run"
    cfg = tiny(run, "data.name=array", f"data.root={data}", "stages=stage1,cache", "stage1.steps=2")
    fastdae.train(cfg)
    images[0] = 255 - images[0]  # item 0's content changes (same file name, size, shape)
    np.save(data, images)
    for stage in ("stage2", "prior"):
        with pytest.raises(ValueError, match="dataset"):
            fastdae.train(apply_overrides(cfg, [f"stages={stage}"]))
        assert not (run / stage / "metrics.json").exists()
