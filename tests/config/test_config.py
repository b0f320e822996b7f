"""Config validation up front: every field of every stage and the cross-field
rules are checked when the config is built, before any training, with messages that name the key,
the allowed values and, for near-miss names, what was probably meant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastdae
from fastdae.config import TrainConfig, apply_overrides, preset

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "override,match",
    [
        ("stage1.batch_size=-4", r"stage1\.batch_size.*>= 1.*-4"),
        ("stage2.batch_size=0", r"stage2\.batch_size"),
        ("prior.batch_size=0", r"prior\.batch_size"),
        ("cache.batch_size=0", r"cache\.batch_size"),
        ("cache.shard_size=0", r"cache\.shard_size"),
        ("stage1.steps=0", r"stage1\.steps.*>= 1"),
        ("stage2.steps=-3", r"stage2\.steps"),
        ("prior.steps=0", r"prior\.steps"),
        ("stage1.log_every=0", r"stage1\.log_every"),
        ("stage2.ckpt_every=0", r"stage2\.ckpt_every"),
        ("prior.ckpt_every=0", r"prior\.ckpt_every"),
        ("stage1.betas=0.5", r"stage1\.betas.*two"),
        ("stage2.betas=[0.5, 1.5]", r"stage2\.betas.*\[0, 1\)"),
        ("stage1.lr=0", r"stage1\.lr.*> 0"),
        ("prior.lr=-1e-4", r"prior\.lr"),
        ("stage1.ema_decay=1.5", r"stage1\.ema_decay.*\[0, 1\)"),
        ("stage1.warmup_steps=-1", r"stage1\.warmup_steps"),
        ("stage1.grad_clip=-1", r"stage1\.grad_clip"),
        ("stage2.chroma_weight=-1", r"stage2\.chroma_weight must be >= 0"),
        ("stage1.disc.lr=0", r"stage1\.disc\.lr"),
        ("prior.num_samples=0", r"prior\.num_samples"),
        ("prior.sample_steps=0", r"prior\.sample_steps"),
        ("prior.judge_steps=-1", r"prior\.judge_steps must be >= 0"),
        ("prior.num_timesteps=0", r"prior\.num_timesteps"),
        ("num_workers=-1", r"num_workers"),
        ("data.size=17", r"data\.size.*17.*downsampl.*2"),
        ("data.size=18", r"data\.size.*18.*patch.*2"),
        ("prior.model=DiT-T2", r"prior\.model.*did you mean 'DiT-T/2'"),
        ("prior.model=GPT", r"prior\.model.*DiT-B/2"),
        ("prior.objective=flwo", r"prior\.objective.*did you mean 'flow'"),
        ("prior.sampler=eular", r"prior\.sampler.*did you mean 'euler'"),
        ("prior.schedule=cosine", r"prior\.schedule.*flow"),
        ("prior.clip_x0=-1", r"prior\.clip_x0 must be >= 0"),
        ("prior.time_sampling=logit", r"prior\.time_sampling.*did you mean 'logit_normal'"),
        ("mode=dea", r"mode.*did you mean 'dae'"),
        ("stages=stage1,cahce", r"stages.*did you mean 'cache'"),
        ("precision=bf61", r"precision.*did you mean 'bf16'"),
        ("device=gpu", r"device.*cuda"),
        ("autoencoder.bottleneck=kv", r"autoencoder\.bottleneck.*did you mean"),
        ("stage2.stepz=3", r"unknown config key 'stage2\.stepz'.*did you mean 'steps'"),
    ],
)
def test_bad_values_are_rejected_when_the_config_is_built(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(preset("tiny"), [override])


def test_ddpm_with_the_cosine_schedule_needs_the_x0_clip():
    with pytest.raises(ValueError, match=r"cosine.*ddpm.*prior\.clip_x0 > 0.*explode"):
        apply_overrides(preset("tiny"), ["prior.objective=ddpm", "prior.schedule=cosine"])
    assert (
        apply_overrides(
            preset("tiny"), ["prior.objective=ddpm", "prior.schedule=cosine", "prior.clip_x0=4"]
        ).prior.clip_x0
        == 4.0
    )


def test_logit_normal_times_are_for_flow():
    with pytest.raises(ValueError, match=r"prior\.time_sampling 'logit_normal' is for prior\.objective 'flow'"):
        apply_overrides(preset("tiny"), ["prior.objective=ddpm", "prior.time_sampling=logit_normal"])
    assert apply_overrides(preset("tiny"), ["prior.time_sampling=logit_normal"]).prior.time_sampling == "logit_normal"


def test_every_preset_is_valid():
    for name in ("default", "vq", "tiny"):
        preset(name)
    TrainConfig()


@pytest.mark.parametrize(
    "study, overrides",
    [
        ("study-shapes", ["prior.time_sampling=uniform", "prior.steps=4000"]),
        ("study-textures", ["data.name=textures", "prior.time_sampling=uniform", "prior.steps=4000"]),
        (
            "study-textures-t1",
            ["data.name=textures", "prior.model=DiT-T/1", "prior.time_sampling=uniform", "prior.steps=4000"],
        ),
        ("study-textures-ln", ["data.name=textures", "prior.model=DiT-T/1", "prior.steps=4000"]),
    ],
)
def test_the_vq_preset_reruns_the_committed_studies(study, overrides):
    """The study commands of results/README.md (--preset vq + these pins) resolve to the config each study ran
    with (report.json), but for out_dir and keys added since, which the recorded config lacks and which
    must be at their defaults; `default` itself no longer does (a KL bottleneck since 2026-12-02)."""
    from fastdae.training.identity import flatten

    recorded = flatten(json.loads((ROOT / "results" / study / "report.json").read_text())["config"])
    now = flatten(apply_overrides(preset("vq"), overrides + ["progress=false"]).to_dict())
    added = flatten(TrainConfig().to_dict())
    diff = {k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k)} - {"out_dir"}
    assert all(k not in recorded and now[k] == added[k] for k in diff), sorted(diff)
    assert preset("default").autoencoder.bottleneck == "kl" and recorded["autoencoder.bottleneck"] == "vq"


def test_unknown_preset_suggests_the_near_miss():
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        preset("tinny")


def test_cuda_without_a_gpu_is_a_config_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device.*'cuda'.*no CUDA"):
        fastdae.train(apply_overrides(preset("tiny"), [f"out_dir={tmp_path / 'run'}", "device=cuda"]))
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_the_dataset_fails_before_training(tmp_path):
    cfg = apply_overrides(preset("tiny"), [f"out_dir={tmp_path / 'run'}", "prior.batch_size=128"])
    with pytest.raises(ValueError, match=r"prior\.batch_size=128.*64"):
        fastdae.train(cfg)
    assert not (tmp_path / "run" / "stage1").exists()
