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


def test_the_lpips_trunk_runs_in_bf16_under_the_stage1_policy_and_stays_close_to_fp32():
    from fastdae.nn import LPIPS

    torch.manual_seed(0)
    lpips = LPIPS(random_init=True)
    x, y = torch.rand(2, 2, 3, 32, 32).mul(2).sub(1).unbind(0)
    seen = []
    conv = next(m for m in lpips.modules() if isinstance(m, torch.nn.Conv2d))
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    y_bf16 = y.clone().requires_grad_(True)
    with autocast(CPU, "bf16", "stage1"):
        d_bf16 = lpips(y_bf16, x).mean()
    d_bf16.backward()
    handle.remove()
    d_fp32 = lpips(y, x).mean()
    assert seen and set(seen) == {torch.bfloat16}  # the first VGG16 conv, on both images
    assert torch.isfinite(y_bf16.grad).all()
    assert abs(d_bf16.item() - d_fp32.item()) <= 0.01 * abs(d_fp32.item())
