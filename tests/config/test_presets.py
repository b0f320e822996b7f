"""The paper-scale presets (fastdae/config/presets/paper.py): each builds, in every arm, with the
published figures it names; a run without data.root is refused when it starts, in one line; and every
stage runs one step at batch 1 on the CPU at 64 px and on the meta device at 256 px (the DiT-XL/2
prior, which the CPU cannot train beside the other jobs here, on the meta device only), so a preset
cannot rot."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

import fastdae
from fastdae.cli import main
from fastdae.config import MODES, STAGES, ConfigError, apply_overrides, check_environment, load_config, preset
from fastdae.config.presets import PRESETS
from fastdae.config.presets.paper import PAPER
from fastdae.plan import count, stage_models

# preset -> figures of the recipe it names, as the config holds them
PUBLISHED = {
    "imagenet256-kl": {
        "autoencoder.ch_mult": [1, 2, 4, 4],
        "autoencoder.z_channels": 4,
        "autoencoder.kl_weight": 1e-6,
        "stage1.disc.start": 50_001,
        "stage1.disc.weight": 0.5,
        "prior.model": "DiT-XL/2",
    },
    "imagenet256-kl-b2": {"autoencoder.downsample": 8, "prior.model": "DiT-B/2"},
    "imagenet256-vq": {
        "autoencoder.ch_mult": [1, 1, 2, 2, 4],
        "autoencoder.num_codes": 1024,
        "autoencoder.z_channels": 256,
        "stage1.disc.start": 250_001,
        "stage1.disc.weight": 0.8,
    },
    "ffhq256-vq": {"autoencoder.downsample": 16, "autoencoder.num_codes": 1024, "prior.class_cond": False},
}
# the CPU steps run at 64 px: at 256 px stage 1 alone took 200 s on the shared 2-core machine (load 11); every
# weight but the DiT's position table is the same at any size, and the 256 px step of every stage runs on
# the meta device (test_every_stage_of_a_paper_preset_takes_a_step_at_256px_on_the_meta_device)
CPU_SIZE = 64
DIT_RECIPE = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.0, "batch_size": 256, "ema_decay": 0.9999}


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_presets():
    assert set(STAGES) == set(preset("default").stages)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(TypeError, match="config must be"):
        load_config(3)


def test_every_paper_preset_is_registered():
    assert set(PAPER) <= set(PRESETS) and len(PAPER) == 4


@pytest.mark.parametrize("name", sorted(PAPER))
def test_a_paper_preset_holds_the_published_figures_it_names(name):
    cfg = preset(name)
    for key, value in PUBLISHED[name].items():
        assert _get(cfg, key) == value, key
    for key, value in DIT_RECIPE.items():
        assert getattr(cfg.prior, key) == value, f"prior.{key}"
    assert cfg.prior.steps == 400_000 and cfg.data.size == 256 and cfg.data.name == "folder"
    assert cfg.stage1.betas == [0.5, 0.9] and cfg.stage1.ema_decay == 0.0
    # the lr is the published base lr 4.5e-6 times the global batch (their main.py's scaling)
    assert cfg.stage1.lr == pytest.approx(4.5e-6 * cfg.stage1.batch_size)
    doc = PAPER[name].__doc__
    assert "inferred" in doc or "Inferred" in doc or name == "imagenet256-kl-b2"


@pytest.mark.parametrize("name", sorted(PAPER))
@pytest.mark.parametrize("mode", MODES)
def test_every_arm_of_a_paper_preset_builds(name, mode):
    cfg = apply_overrides(preset(name), [f"mode={mode}"])
    assert cfg.mode == mode and cfg.weak_decoder.width_mult == 0.5


def test_a_paper_preset_without_data_root_is_refused_when_the_run_starts(capsys):
    cfg = preset("imagenet256-kl")  # builds without a root
    assert cfg.data.root is None
    with pytest.raises(ConfigError, match=r"data\.root is required for data\.name='folder'"):
        check_environment(cfg)
    assert main(["train", "--preset", "ffhq256-vq", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.root is required" in err


def _image_folder(root, classes=2, per_class=2):
    """A few small random images in class subfolders (resized to 256 px by the folder dataset)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def one_step_overrides(root, out):
    """Every stage for one step at batch 1, the GAN and LPIPS (random VGG16) on from the first step."""
    ae = [
        f"{s}.{k}={v}"
        for s in ("stage1", "stage2")
        for k, v in {
            "steps": 1,
            "batch_size": 1,
            "log_every": 1,
            "ckpt_every": 1,
            "disc.start": 0,
            "lpips_random_init": "true",
        }.items()
    ]
    prior = [
        f"prior.{k}={v}"
        for k, v in {
            "steps": 1,
            "batch_size": 1,
            "log_every": 1,
            "ckpt_every": 1,
            "num_samples": 1,
            "sample_steps": 2,
        }.items()
    ]
    return [
        f"out_dir={out}",
        f"data.root={root}",
        f"data.size={CPU_SIZE}",
        "data.holdout=1",
        "device=cpu",
        "progress=false",
        "num_workers=0",
        "cache.batch_size=2",
        "cache.shard_size=4",
        *ae,
        *prior,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["imagenet256-kl-b2", "ffhq256-vq"])  # the others differ as the tests below check
def test_every_stage_of_a_paper_preset_runs_one_step_on_the_cpu(tmp_path, name):
    classes = 1 if name.startswith("ffhq") else 2  # FFHQ: images directly in one folder, one class
    root = _image_folder(tmp_path / "images", classes=classes, per_class=4 // classes)  # 4 images, 1 held out
    cfg = apply_overrides(preset(name), one_step_overrides(root, tmp_path / "run"))
    result = fastdae.train(cfg)
    stages = result.metrics["stages"]
    for s in ("stage1", "stage2", "prior"):
        assert stages[s]["steps"] == 1 and np.isfinite(stages[s]["final"]["loss"]), s
    assert "d_loss" in stages["stage1"]["final"] and "lpips" in stages["stage1"]["final"]
    assert stages["cache"]["count"] == 3 * (2 if cfg.cache.flip else 1)
    assert result.sample_grid is not None and result.sample_grid.is_file()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_every_stage_of_a_paper_preset_takes_a_step_at_256px_on_the_meta_device(name):
    cfg = preset(name)
    for stage in ("stage1", "cache", "stage2", "prior"):
        models = stage_models(cfg, stage, "meta")
        models.step(1, True)  # the GAN's terms on
        for module in models.trained:
            trained = [p for p in module.parameters() if p.requires_grad]  # not the DiT's fixed position table
            assert trained and all(p.grad is not None and p.grad.is_meta for p in trained), stage


def test_imagenet256_kl_is_the_b2_preset_with_a_dit_xl2_prior():
    xl, b2 = preset("imagenet256-kl").to_dict(), preset("imagenet256-kl-b2").to_dict()
    for d in (xl, b2):
        d.pop("out_dir")
        d["prior"].pop("model")
    assert xl == b2  # the autoencoder stages run in the CPU test above; the prior differs in size only


def test_imagenet256_vq_is_the_ffhq_preset_with_imagenet_classes_and_schedule():
    """The two VQGAN presets share every module; the CPU test runs ffhq256-vq (about a minute a preset
    on an idle 2-core machine, the prior's 130M-parameter checkpoint most of it)."""
    vq, ffhq = preset("imagenet256-vq").to_dict(), preset("ffhq256-vq").to_dict()
    differ = {
        "out_dir",
        "prior.class_cond",
        "prior.cfg_scale",
        "stage1.steps",
        "stage2.steps",
        "stage1.disc.start",
        "stage2.disc.start",
    }
    for key in differ:
        *path, leaf = key.split(".")
        for d in (vq, ffhq):
            for part in path:
                d = d[part]
            d.pop(leaf)
    assert vq == ffhq


def test_the_dit_xl2_prior_of_imagenet256_kl_takes_a_step_on_the_meta_device():
    """675M parameters: Adam, EMA and gradients would take ~13 GB of the shared machine's 24, so its
    training step (Diffusion.loss and backward, as the trainer runs it) runs on the meta device."""
    cfg = preset("imagenet256-kl")
    models = stage_models(cfg, "prior", "meta")
    dit = models.trained[0]
    assert 670e6 < sum(p.numel() for p in dit.parameters()) < 680e6  # DiT-XL/2: 675M
    models.step(1, False)
    assert all(p.grad is not None and p.grad.is_meta for p in dit.parameters() if p.requires_grad)
    # DiT's paper: 118.6 GFLOPs (multiply-adds) forward at 256 px; forward + backward = 3x, 2 FLOPs a MAC
    assert count(lambda b: models.step(b, False)).flops_per_image == pytest.approx(6 * 118.6e9, rel=0.01)


def test_a_preset_is_a_fresh_config_each_call():
    a = preset("imagenet256-vq")
    a.stage1.steps = 1
    assert preset("imagenet256-vq").stage1.steps == 300_000 and dataclasses.is_dataclass(a)
