"""fastdae.train end to end at a tiny budget, config round trips, stage isolation, resume, NaN guard, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastdae
from fastdae.config import TrainConfig, apply_overrides
from fastdae.models.autoencoder import Encoder
from fastdae.training import distributed
from fastdae.training.optim import NonFiniteLossError
from tests.utils import read_log, tiny

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dae_vq_run(tmp_path_factory) -> fastdae.Result:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fastdae.train(tiny(tmp_path_factory.mktemp("dae_vq")))
    finally:
        torch.set_num_threads(n)


def test_train_is_the_function_whatever_was_imported():
    import fastdae.training.distributed  # noqa: F401  (binds fastdae.training, never fastdae.train)
    from fastdae import train
    from fastdae.training import train as train_function

    assert fastdae.train is train is train_function and "fastdae.train" not in sys.modules


# ---- end to end -------------------------------------------------------------------------------
def check_run(result: fastdae.Result, cfg: TrainConfig) -> dict:
    summary = json.loads(result.summary.read_text())
    stages = summary["stages"]
    assert result.sample_grid.is_file() and result.cache is not None
    assert (result.run_dir / "config.yaml").is_file()
    assert TrainConfig.load(result.run_dir / "config.yaml") == cfg
    n1 = cfg.stage1.steps + (cfg.stage2.steps if cfg.mode == "joint" else 0)
    assert stages["stage1"]["steps"] == n1 and len(read_log(result.run_dir / "stage1" / "log.csv")) == n1
    assert stages["stage1"]["decoder"] == ("weak" if cfg.mode == "dae" else "full")
    assert ("stage2" in stages) == (cfg.mode != "joint")
    assert stages["samples"]["decoder"] == ("stage1" if cfg.mode == "joint" else "stage2") + "/decoder.safetensors"
    for name in ("stage1", "prior", *(["stage2"] if cfg.mode != "joint" else [])):
        assert stages[name]["images_per_s"] > 0 and all(map(lambda v: v == v, stages[name]["final"].values()))
    images = load_file(str(result.run_dir / "samples" / "images.safetensors"))["images"]
    assert images.shape == (cfg.prior.num_samples, 3, cfg.data.size, cfg.data.size) and images.abs().max() <= 1
    assert stages["stage1"]["lpips"] is False  # no weights in the tiny preset: off, and said so
    return stages


@pytest.mark.parametrize(
    "mode,bottleneck", [("dae", "kl"), ("joint", "vq"), ("joint", "kl"), ("control", "vq"), ("control", "kl")]
)
def test_end_to_end(tmp_path, mode, bottleneck):
    cfg = tiny(tmp_path, f"mode={mode}", f"autoencoder.bottleneck={bottleneck}")
    stages = check_run(fastdae.train(cfg), cfg)
    fields = {"vq": ["indices", "label"], "kl": ["label", "logvar", "mean"]}[bottleneck]
    assert stages["cache"]["fields"] == fields


def test_end_to_end_dae_vq(dae_vq_run):
    cfg = TrainConfig.load(dae_vq_run.run_dir / "config.yaml")
    check_run(dae_vq_run, cfg)
    weak = load_file(str(dae_vq_run.checkpoints["stage1_decoder"]))
    full = load_file(str(dae_vq_run.checkpoints["stage2_decoder"]))
    assert sum(v.numel() for v in weak.values()) < sum(v.numel() for v in full.values())


def test_a_run_draws_its_loss_curves_and_readable_grids(dae_vq_run):
    from PIL import Image

    pytest.importorskip("matplotlib")
    root = dae_vq_run.run_dir
    with Image.open(root / "curves.png") as curves:
        assert curves.width == 3 * 450  # one 4.5-inch panel per stage with a log.csv: stage1, stage2, prior
    for grid in ("stage1/reconstructions.png", "stage2/reconstructions.png", "samples/grid.png"):
        with Image.open(root / grid) as im:
            assert min(im.size) >= 256, (grid, im.size)  # 16 px images, nearest-upscaled


def test_lpips_off_is_said_once_per_run_folder(dae_vq_run, tmp_path):
    import shutil

    shutil.copytree(dae_vq_run.run_dir, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "notices.json").read_text())["lpips_off"].startswith("LPIPS is off")
    cfg = apply_overrides(
        TrainConfig.load(dae_vq_run.run_dir / "config.yaml"), ["stages=stage2", f"out_dir={tmp_path / 'run'}"]
    )
    fastdae.train(cfg)  # a second call that builds the losses again
    said = (tmp_path / "run" / "train.log").read_text().count("LPIPS is off")
    assert said == 1  # stage 1 and stage 2 of the first call and stage 2 of this one: said once


def test_later_stages_never_build_the_encoder(dae_vq_run, monkeypatch, tmp_path):
    import shutil

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was constructed after the cache step")

    monkeypatch.setattr(Encoder, "__init__", refuse)
    shutil.copytree(dae_vq_run.run_dir, tmp_path / "run")
    cfg = apply_overrides(
        TrainConfig.load(dae_vq_run.run_dir / "config.yaml"),
        ["stages=stage2,prior,samples", f"out_dir={tmp_path / 'run'}"],
    )
    result = fastdae.train(cfg)
    assert result.metrics["stages"]["stage2"]["steps_this_run"] == cfg.stage2.steps
    with pytest.raises(AssertionError, match="encoder was constructed"):  # the patch does bite
        fastdae.train(apply_overrides(cfg, ["stages=stage1"]))


def test_stage_alone_needs_earlier_outputs(tmp_path):
    from fastdae.cache import CacheError

    with pytest.raises(FileNotFoundError, match="run stage1 first"):
        fastdae.train(tiny(tmp_path, "stages=cache"))
    with pytest.raises(CacheError, match="no latent cache"):
        fastdae.train(tiny(tmp_path, "stages=stage2"))


def test_resume_skips_finished_stages(dae_vq_run):
    cfg = apply_overrides(TrainConfig.load(dae_vq_run.run_dir / "config.yaml"), ["resume=true"])
    before = (dae_vq_run.run_dir / "stage1" / "metrics.json").read_text()
    result = fastdae.train(cfg)
    assert (dae_vq_run.run_dir / "stage1" / "metrics.json").read_text() == before
    assert result.metrics["stages"]["cache"] == dae_vq_run.metrics["stages"]["cache"]


def test_samples_are_judged_in_the_summary(dae_vq_run, tmp_path):
    import shutil

    shutil.copytree(dae_vq_run.run_dir, tmp_path / "run")
    cfg = apply_overrides(
        TrainConfig.load(dae_vq_run.run_dir / "config.yaml"),
        ["stages=samples", "prior.judge_steps=20", f"out_dir={tmp_path / 'run'}"],
    )
    samples = fastdae.train(cfg).metrics["stages"]["samples"]
    assert 0 <= samples["class_accuracy"] <= 1 and 0 <= samples["validity"] <= 1 and samples["fd_feat"] >= 0
    judge = samples["judge"]
    assert judge["classifier_steps"] == 20 and judge["validity_threshold"] == 0.9
    assert judge["train_items"] == cfg.data.num_samples and judge["heldout_items"] > 0  # scored on held-out items
    assert 0 <= judge["validity_real"] <= 1 and 0 <= judge["classifier_accuracy"] <= 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["samples"]["class_accuracy"] == samples["class_accuracy"]
    # the classifier is kept and reused by the next samples stage; judge_steps 0 judges nothing
    weights = tmp_path / "run" / "judge" / "classifier.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert fastdae.train(cfg).metrics["stages"]["samples"]["validity"] == samples["validity"]
    assert weights.stat().st_mtime_ns == stamp
    off = fastdae.train(apply_overrides(cfg, ["prior.judge_steps=0"])).metrics["stages"]["samples"]
    assert "class_accuracy" not in off and "judge" not in off


# ---- resume and failure -----------------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from fastdae.config import TrainConfig
    from fastdae.training import distributed, train

    kill_at = int(sys.argv[2])
    seed_step = distributed.seed_step

    def seed_or_die(seed, stage, step, rank):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        seed_step(seed, stage, step, rank)

    distributed.seed_step = seed_or_die
    train(TrainConfig.load(sys.argv[1]))
""")

RESUME_OVERRIDES = [
    "stages=stage1",
    "mode=dae",
    "autoencoder.bottleneck=kl",
    "stage1.steps=6",
    "stage1.ckpt_every=2",
    "stage1.log_every=1",
    "weak_decoder.dropout=0.2",
]


def test_sigkill_and_resume_reproduce_the_loss_curve(tmp_path):
    straight = fastdae.train(tiny(tmp_path / "straight", *RESUME_OVERRIDES))
    cfg = tiny(tmp_path / "killed", *RESUME_OVERRIDES, "resume=true")
    cfg_file = tmp_path / "killed.yaml"
    cfg.save(cfg_file)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(cfg_file), "5"], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    stage_dir = tmp_path / "killed" / "stage1"
    assert (stage_dir / "latest").read_text() == "ckpt-00000004" and not (stage_dir / "metrics.json").exists()
    assert len(read_log(stage_dir / "log.csv")) == 5  # step 5 was logged, then the process died
    fastdae.train(cfg)  # resumes from step 4 in this process
    want, got = read_log(straight.run_dir / "stage1" / "log.csv"), read_log(stage_dir / "log.csv")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got, strict=True):
        for key in ("loss", "l1", "aux", "d_loss"):
            if a.get(key):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5, abs=1e-7), (a["step"], key)
    w_straight = load_file(str(straight.run_dir / "stage1" / "encoder.safetensors"))
    w_resumed = load_file(str(stage_dir / "encoder.safetensors"))
    for k in w_straight:
        torch.testing.assert_close(w_resumed[k], w_straight[k], rtol=1e-5, atol=1e-6)


def test_interrupted_stage2_and_prior_resume_exactly(dae_vq_run, tmp_path, monkeypatch):
    """Stage 2 and the prior read the cache loader: resumed runs must see the same batches."""
    import shutil

    overrides = [
        "stages=stage2,prior",
        "stage2.steps=5",
        "prior.steps=5",
        "stage2.ckpt_every=2",
        "prior.ckpt_every=2",
        "stage2.log_every=1",
        "prior.log_every=1",
    ]
    runs = {}
    for name in ("straight", "interrupted"):
        runs[name] = tmp_path / name
        shutil.copytree(dae_vq_run.run_dir, runs[name], ignore=shutil.ignore_patterns("stage2", "prior", "samples"))
    base = TrainConfig.load(dae_vq_run.run_dir / "config.yaml")
    fastdae.train(apply_overrides(base, [f"out_dir={runs['straight']}", *overrides]))

    cfg = apply_overrides(base, [f"out_dir={runs['interrupted']}", *overrides, "resume=true"])
    seed_step, interrupted = distributed.seed_step, set()

    def interrupt_once(seed, stage, step, rank):
        if step == 3 and stage not in interrupted:
            interrupted.add(stage)
            raise KeyboardInterrupt
        seed_step(seed, stage, step, rank)

    monkeypatch.setattr(distributed, "seed_step", interrupt_once)
    for _ in range(2):  # stage 2 stops at step 3; then it resumes and finishes, and the prior stops at step 3
        with pytest.raises(KeyboardInterrupt):
            fastdae.train(cfg)
    assert interrupted == {"stage2", "prior"}
    fastdae.train(cfg)
    for stage in ("stage2", "prior"):
        want, got = (read_log(runs[n] / stage / "log.csv") for n in ("straight", "interrupted"))
        assert [r["step"] for r in got] == [str(i) for i in range(1, 6)]
        for a, b in zip(want, got, strict=True):
            assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5, abs=1e-7), (stage, a["step"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from fastdae.models.losses import AutoencoderLoss

    generator_loss = AutoencoderLoss.generator_loss

    def poisoned(self, x, x_hat, aux, step, last_layer):
        loss, terms = generator_loss(self, x, x_hat, aux, step, last_layer)
        return (loss * float("nan") if step >= 3 else loss), terms

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", poisoned)
    cfg = tiny(tmp_path, "stages=stage1", "stage1.steps=6", "stage1.ckpt_every=2", "stage1.log_every=3")
    with pytest.raises(NonFiniteLossError, match="stage1: the loss became NaN/Inf at or before step 4"):
        fastdae.train(cfg)
    stage_dir = tmp_path / "stage1"
    assert (stage_dir / "latest").read_text() == "ckpt-00000002"
    assert sorted(p.name for p in stage_dir.glob("ckpt-*")) == ["ckpt-00000002"]
    assert not (stage_dir / "encoder.safetensors").exists()


def test_stage2_on_another_data_seed_is_refused(dae_vq_run):
    """A regression: `--stages stage2 --data.seed 7` once paired cached latents with other images."""
    cfg = apply_overrides(TrainConfig.load(dae_vq_run.run_dir / "config.yaml"), ["stages=stage2", "data.seed=7"])
    before = (dae_vq_run.run_dir / "stage2" / "metrics.json").read_text()
    with pytest.raises(ValueError, match=r"data\.seed"):
        fastdae.train(cfg)
    assert (dae_vq_run.run_dir / "stage2" / "metrics.json").read_text() == before
