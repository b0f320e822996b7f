"""fastdae.config.checks: every float key rejects NaN and inf up front, seeds fit a 64-bit generator, a
VQ codebook has at least two codes, and a run never writes inside its own image folder."""

from __future__ import annotations

import pytest
from PIL import Image

import fastdae
from fastdae.config import ConfigError, TrainConfig, apply_overrides, preset


@pytest.mark.parametrize(
    "override,match",
    [
        ("prior.cfg_scale=inf", r"prior\.cfg_scale must be a finite number, got inf"),
        ("prior.cfg_scale=nan", r"prior\.cfg_scale must be a finite number, got nan"),
        ("stage1.lr=inf", r"stage1\.lr must be a finite number"),
        ("prior.lr=1e999", r"prior\.lr must be a finite number"),
        ("stage2.weight_decay=inf", r"stage2\.weight_decay must be a finite number"),
        ("prior.weight_decay=nan", r"prior\.weight_decay must be a finite number"),
        ("autoencoder.vq_beta=inf", r"autoencoder\.vq_beta must be a finite number"),
        ("stage1.betas=[0.5, nan]", r"stage1\.betas\[1\] must be a finite number"),
        ("seed=100000000000000000000000", r"seed must be in \[0, 2\*\*63\)"),
        ("seed=-1", r"seed must be in \[0, 2\*\*63\)"),
        ("data.seed=18446744073709551616", r"data\.seed must be in \[0, 2\*\*63\)"),
        ("autoencoder.num_codes=1", r"autoencoder\.num_codes must be >= 2"),
        ("autoencoder.num_codes=0", r"autoencoder\.num_codes must be >= 2"),
    ],
)
def test_non_finite_floats_overflowing_seeds_and_one_code_codebooks_are_refused_by_key(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(preset("tiny"), [override])


def test_a_yaml_config_with_an_infinite_learning_rate_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage1:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"stage1\.lr must be a finite number"):
        TrainConfig.load(path, base=preset("tiny"))


def test_an_out_dir_inside_the_image_folder_is_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "images"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(data / c / f"{i}.png")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out in (data / "runs" / "x", data):
        cfg = apply_overrides(preset("tiny"), [f"out_dir={out}", "data.name=folder", f"data.root={data}"])
        with pytest.raises(ConfigError, match=r"out_dir=.* lies inside data\.root"):
            fastdae.train(cfg)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
