"""fastdae.precision: the per-stage autocast policy (bf16 on CPU only where it pays)."""

from __future__ import annotations

import logging

import pytest
import torch

from fastdae.config import preset
from fastdae.precision import CPU_BF16_STAGES, _say_once, autocast, resolve
from fastdae.training.resources import RunResources

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "device, precision, stage, expected",
    [
        (CPU, "auto", "stage1", "fp32"),
        (CPU, "fp32", "stage1", "fp32"),
        (CPU, "bf16", "stage1", "bf16"),
        (CPU, "bf16", "cache", "bf16"),
        (CPU, "bf16", "stage2", "bf16"),
        (CPU, "bf16", "decode", "bf16"),
        (CPU, "bf16", None, "bf16"),
        (CPU, "bf16", "prior", "fp32"),
        (CPU, "bf16", "samples", "fp32"),
        (CUDA, "auto", "prior", "bf16"),
        (CUDA, "bf16", "prior", "bf16"),
        (CUDA, "fp32", "stage1", "fp32"),
        (CUDA, "fp16", "prior", "fp16"),
    ],
)
def test_the_policy_picks_bf16_on_cpu_for_the_autoencoder_stages_only(device, precision, stage, expected):
    assert resolve(device, precision, stage) == expected


def test_cpu_autocast_is_on_in_stage1_and_off_in_the_prior_under_bf16(caplog):
    with autocast(CPU, "bf16", "stage1"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    _say_once.cache_clear()  # the notice is logged once per stage name and process
    with caplog.at_level(logging.INFO, logger="fastdae"), autocast(CPU, "bf16", "prior"):
        assert not torch.is_autocast_enabled("cpu")
    assert "precision bf16 on CPU: prior runs in fp32" in caplog.text
    with autocast(CPU, "auto", "stage1"):
        assert not torch.is_autocast_enabled("cpu")


def test_a_run_autocasts_by_the_stage_it_is_in(tmp_path):
    cfg = preset("tiny")
    cfg.out_dir, cfg.precision, cfg.device = str(tmp_path / "run"), "bf16", "cpu"
    r = RunResources(cfg)
    for stage in ("stage1", "cache", "stage2", "prior"):
        r.stage = stage
        with r.autocast():
            assert torch.is_autocast_enabled("cpu") == (stage in CPU_BF16_STAGES), stage
