"""Configs as dicts, YAML and typed dotted overrides (fastdae.config.parse)."""

from __future__ import annotations

import pytest

from fastdae.config import TrainConfig, apply_overrides, load_config, preset


def test_config_round_trips_through_dict_and_yaml(tmp_path):
    cfg = apply_overrides(preset("default"), ["mode=control", "autoencoder.bottleneck=kl"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert load_config(cfg.to_dict()) == cfg
    partial = TrainConfig.from_dict({"stage2": {"steps": 7}})
    assert partial.stage2.steps == 7 and partial.stage1 == TrainConfig().stage1


def test_overrides_are_typed():
    cfg = apply_overrides(
        TrainConfig(),
        [
            "stage2.steps=2000",
            "stage1.lr=1e-3",
            "autoencoder.ch_mult=1,2,4",
            "progress=false",
            "data.root=none",
            "stage1.disc.weight=0",
            "stage1.lpips_trunk=/w/vgg.pth",
            "stages=[stage1, cache]",
        ],
    )
    assert cfg.stage2.steps == 2000 and isinstance(cfg.stage2.steps, int)
    assert cfg.stage1.lr == 1e-3 and cfg.autoencoder.ch_mult == [1, 2, 4] and cfg.progress is False
    assert cfg.data.root is None and cfg.stage1.disc.weight == 0.0 and cfg.stage1.lpips_trunk == "/w/vgg.pth"
    assert cfg.stages == ["stage1", "cache"]
    assert apply_overrides(TrainConfig(), {"seed": "3"}).seed == 3
    assert apply_overrides(TrainConfig(), ['stages=["stage1", "cache"]']).stages == ["stage1", "cache"]  # JSON list


@pytest.mark.parametrize(
    "override,error,match",
    [
        ("stage2.stepz=3", ValueError, "unknown config key 'stage2.stepz'"),
        ("stage2.steps=3.5", ValueError, "expects int"),
        ("progress=maybe", ValueError, "expects a bool"),
        ("mode=both", ValueError, "mode must be one of"),
        ("stages=prior,stage1", ValueError, "run order"),
        ("stages=stage3", ValueError, "unknown stage"),
        ("stage2=3", TypeError, "must be a mapping"),
        ("nokey", ValueError, "key.sub=value"),
    ],
)
def test_bad_overrides_are_rejected(override, error, match):
    with pytest.raises(error, match=match):
        apply_overrides(TrainConfig(), [override])
