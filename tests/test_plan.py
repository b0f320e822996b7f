"""fastdae.plan and `python -m fastdae plan`: FLOPs counted on the meta device, memory and the largest
batch, the cache's size, the time estimate, the table and --json."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fastdae.cli import main
from fastdae.config import apply_overrides, preset
from fastdae.plan import GPUS, HEADROOM, cache_bytes_per_image, count, plan, stage_models, table


def test_count_gives_a_conv_layer_its_forward_and_backward_flops_per_image():
    with torch.device("meta"):
        conv = nn.Conv2d(8, 16, 3, padding=1)

    def step(batch: int) -> None:
        x = torch.randn(batch, 8, 10, 10, device="meta", requires_grad=True)
        conv(x).sum().backward()

    c = count(step)
    macs = 16 * 8 * 9 * 10 * 10  # per image
    assert c.flops_per_image == 3 * 2 * macs  # forward, grad of input, grad of weight
    assert c.activation_bytes_per_image == 8 * 10 * 10 * 4  # the fp32 input the weight gradient needs


def test_the_meta_count_equals_the_count_of_the_same_step_on_the_cpu_plus_the_fused_attention():
    """On the CPU the DiT's attention runs fastdae's fused kernel, which FlopCounterMode cannot see; on
    the meta device it runs as matmuls and is counted: 12 N^2 d FLOPs a layer (QK^T and PV forward,
    four matmuls backward), the whole difference."""
    cfg = preset("tiny")
    diffs = {}
    for stage in ("stage1", "cache", "prior"):
        torch.manual_seed(0)
        on_meta, on_cpu = stage_models(cfg, stage, "meta"), stage_models(cfg, stage, "cpu")
        meta = count(lambda b, m=on_meta: m.step(b, True))
        cpu = count(lambda b, m=on_cpu: m.step(b, True))
        assert cpu.flops_per_image > 0
        diffs[stage] = meta.flops_per_image - cpu.flops_per_image
    dit = stage_models(cfg, "prior", "meta").trained[0]
    tokens, width = dit.grid**2, dit.pos_embed.shape[-1]
    assert diffs == {"stage1": 0, "cache": 0, "prior": 12 * tokens**2 * width * len(dit.blocks)}


def test_a_plan_covers_every_stage_and_its_largest_batch_fits_the_gpu():
    cfg = preset("imagenet256-vq")
    p = plan(cfg, gpu="h200", gpus=4, images=100_000, mfu=0.5, name="imagenet256-vq")
    assert [s.stage for s in p.stages] == ["stage1", "cache", "stage2", "prior"]
    mem = GPUS["h200"].memory_bytes
    for s in p.stages:
        assert s.flops_per_image > 0 and s.activation_bytes_per_image > 0, s.stage
        assert s.static_bytes + s.max_batch_per_gpu * s.activation_bytes_per_image <= HEADROOM * mem
        assert s.static_bytes + (s.max_batch_per_gpu + 1) * s.activation_bytes_per_image > HEADROOM * mem
        assert s.estimated_hours == pytest.approx(s.total_flops / (4 * 989e12 * 0.5) / 3600)
    s1 = p.stages[0]
    # the GAN's terms cost more; they are on for the steps past disc.start only
    assert s1.flops_per_image > s1.flops_per_image_no_gan
    gan_steps = cfg.stage1.steps - cfg.stage1.disc.start
    expected = cfg.stage1.batch_size * (
        gan_steps * s1.flops_per_image + (cfg.stage1.steps - gan_steps) * s1.flops_per_image_no_gan
    )
    assert s1.total_flops == pytest.approx(expected)
    cache = p.stages[1]
    assert cache.images == 2 * (100_000 - 10_000)  # flipped copies; 10,000 held out
    assert cache.cache_bytes == cache.images * (16 * 16 * 2 + 2)  # uint16 codes and labels


def test_the_time_estimate_scales_with_gpus_and_mfu():
    cfg = preset("tiny")
    a, b = plan(cfg, gpus=1, mfu=0.2), plan(cfg, gpus=4, mfu=0.4)
    assert a.estimated_hours == pytest.approx(8 * b.estimated_hours)


def test_joint_trains_stage1_for_both_budgets_and_has_no_stage2():
    cfg = apply_overrides(preset("tiny"), ["mode=joint"])
    p = plan(cfg)
    assert [s.stage for s in p.stages] == ["stage1", "cache", "prior"]
    assert p.stages[0].images == (cfg.stage1.steps + cfg.stage2.steps) * cfg.stage1.batch_size


def test_kl_cache_items_hold_mean_and_logvar_in_float16():
    cfg = preset("imagenet256-kl")
    assert cache_bytes_per_image(cfg, 1000) == 2 * 4 * 32 * 32 * 2 + 2


def test_the_plan_command_prints_a_table_and_json(capsys):
    assert main(["plan", "--preset", "tiny", "--gpus", "2", "--gpu", "a100", "--mfu", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "2 x NVIDIA A100 SXM" in out and "MFU 0.30" in out and "estimated" in out
    assert main(["plan", "--preset", "tiny", "--json", "--stage1.steps", "7"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["times"] == "estimated" and report["stages"][0]["images"] == 7 * 8
    assert math.isclose(report["estimated_hours"], sum(s["estimated_hours"] for s in report["stages"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpu", "b200"], "gpu must be one of"),
        (["--gpus", "0"], "gpus must be >= 1"),
        (["--mfu", "1.5"], "mfu in"),
        (["--images", "0"], "images must be >= 1"),
        (["--stage1.steps", "0"], "stage1.steps must be >= 1"),
    ],
)
def test_the_plan_command_rejects_bad_arguments_in_one_line(capsys, argv, message):
    assert main(["plan", "--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_table_names_every_stage():
    text = table(plan(preset("tiny"), name="tiny"))
    for stage in ("stage1", "cache", "stage2", "prior"):
        assert f"\n{stage}" in text
