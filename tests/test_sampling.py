"""fastdae.sample / `python -m fastdae sample`: 1,000 samples of a tiny run as an ADM-evaluator .npz,
per-sample seeding, exact resume after an interruption, settings checks, and torchrun sharding."""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdae
from fastdae import sampling
from fastdae.cli import main
from fastdae.config import apply_overrides, load_config, preset
from fastdae.files import sha256_file
from fastdae.sampler import to_uint8
from fastdae.training.identity import RunError
from tests.utils import torchrun

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(tmp_path_factory, name: str, *overrides: str) -> Path:
    """A finished run of the tiny preset (one thread: module fixtures run outside one_thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp(name)
        fastdae.train(apply_overrides(preset("tiny"), [f"out_dir={out}", *overrides]))
        return out
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run (16x16 shapes, VQ, class-conditional DiT-T/2 over 4 classes)."""
    return tiny_run(tmp_path_factory, "run", "stage1.steps=2", "stage2.steps=2")


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["arr_0"], f["arr_1"]


def test_thousand_samples_as_an_adm_npz(run_dir, tmp_path):
    out = fastdae.sample(
        run_dir,
        num_samples=1000,
        out=tmp_path / "samples.npz",
        png_dir=tmp_path / "png",
        batch_size=250,
        progress=False,
    )
    # what guided-diffusion's evaluator does: open arr_0.npy in the zip, read a 1.0/2.0 header, stream C-order uint8
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == ["arr_0.npy", "arr_1.npy"]
        with zf.open("arr_0.npy") as f:
            assert np.lib.format.read_magic(f) == (1, 0)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    assert (shape, fortran, dtype) == ((1000, 16, 16, 3), False, np.uint8)
    images, labels = read_npz(out)
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [250] * 4  # class-balanced
    assert images.std() > 1  # decoded images, not a constant
    assert not np.array_equal(images[0], images[4])  # same class, other noise
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 1000 and pngs[0].name == "000000.png"
    assert np.array_equal(np.asarray(Image.open(pngs[7])), images[7])
    assert not (tmp_path / "samples.npz.parts").exists()  # merged, then removed
    record = json.loads((tmp_path / "samples.npz.json").read_text())
    assert record["settings"]["num_samples"] == 1000 and record["samples_this_run"] == 1000


@pytest.fixture(scope="module")
def kl_joint_run(tmp_path_factory) -> Path:
    """The other branches: KL latents (no code snapping) and mode "joint" (stage 1's decoder is final)."""
    return tiny_run(
        tmp_path_factory, "kl_joint", "autoencoder.bottleneck=kl", "mode=joint", "stage1.steps=2", "stage2.steps=1"
    )


@pytest.mark.parametrize("run", ["run_dir", "kl_joint_run"])
def test_load_sampler_decodes_as_the_trainers_samples_stage(run, request):
    """Given the trainer's noise (one generator seeded with the run's seed, labels cycling), the
    sampler reproduces samples/images.safetensors: same DiT weights, latent scale, snapping, decoder."""
    from safetensors.torch import load_file

    run_dir = request.getfixturevalue(run)
    s = sampling.load_sampler(run_dir, torch.device("cpu"))
    trainer = load_file(run_dir / "samples" / "images.safetensors")
    n = trainer["images"].shape[0]
    images = s.generate(n, trainer["labels"], torch.Generator().manual_seed(0))
    assert torch.equal(images, to_uint8(trainer["images"]))
    assert (s.bottleneck is None) == (run == "kl_joint_run")


def test_a_sample_depends_on_its_index_not_its_batch(run_dir, tmp_path):
    a, la = read_npz(fastdae.sample(run_dir, 12, tmp_path / "a.npz", batch_size=12, progress=False))
    b, lb = read_npz(fastdae.sample(run_dir, 12, tmp_path / "b.npz", batch_size=5, progress=False))
    assert np.array_equal(la, lb)
    # same noise per index; only float rounding inside batched matmuls may differ, by a level at most
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert (a == b).mean() > 0.99
    c, _ = read_npz(fastdae.sample(run_dir, 12, tmp_path / "c.npz", batch_size=12, seed=1, progress=False))
    assert not np.array_equal(a, c)


def test_an_interrupted_run_resumes_bitwise(run_dir, tmp_path, monkeypatch):
    straight = read_npz(fastdae.sample(run_dir, 20, tmp_path / "straight.npz", batch_size=4, progress=False))
    generate, calls = sampling.Sampler.generate, []

    def crash_after_two(self, n, labels, generators):
        calls.append(n)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return generate(self, n, labels, generators)

    monkeypatch.setattr(sampling.Sampler, "generate", crash_after_two)
    out = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        fastdae.sample(run_dir, 20, out, batch_size=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "resumed.npz.parts").glob("*.npz")) == [
        "00000000-00000004.npz",
        "00000004-00000008.npz",
    ]
    assert not out.exists()
    monkeypatch.setattr(sampling.Sampler, "generate", generate)
    resumed = read_npz(fastdae.sample(run_dir, 20, out, batch_size=4, progress=False))
    assert all(np.array_equal(x, y) for x, y in zip(straight, resumed, strict=True))
    assert json.loads((tmp_path / "resumed.npz.json").read_text())["samples_this_run"] == 12  # only the gaps


def test_other_settings_are_refused_not_mixed(run_dir, tmp_path):
    out = fastdae.sample(run_dir, 8, tmp_path / "s.npz", batch_size=8, progress=False)
    assert fastdae.sample(run_dir, 8, out, batch_size=4, progress=False) == out  # complete: nothing to do
    with pytest.raises(FileExistsError, match="other settings"):
        fastdae.sample(run_dir, 8, out, seed=1, progress=False)
    (tmp_path / "foreign.npz").write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError, match="not written by fastdae sample"):
        fastdae.sample(run_dir, 8, tmp_path / "foreign.npz", progress=False)
    parts = tmp_path / "p.npz.parts"
    parts.mkdir()
    (parts / sampling.SETTINGS_FILE).write_text(json.dumps({"seed": 5}))
    with pytest.raises(FileExistsError, match="partial samples of other settings"):
        fastdae.sample(run_dir, 8, tmp_path / "p.npz", progress=False)


def test_settings_added_since_count_as_unchanged_at_their_default(run_dir, tmp_path):
    out = fastdae.sample(run_dir, 8, tmp_path / "s.npz", batch_size=8, progress=False)
    sidecar = tmp_path / "s.npz.json"
    record = json.loads(sidecar.read_text())
    del record["settings"]["clip_x0"]  # as written before the sampler had the setting
    sidecar.write_text(json.dumps(record))
    assert fastdae.sample(run_dir, 8, out, batch_size=4, progress=False) == out  # the default: same samples
    record["settings"]["clip_x0"] = 4.0  # recorded with another value: other samples
    sidecar.write_text(json.dumps(record))
    with pytest.raises(FileExistsError, match="other settings"):
        fastdae.sample(run_dir, 8, out, progress=False)
    record["settings"]["dit_sha256"] = "0" * 64  # a key that is not a config key is never assumed
    del record["settings"]["clip_x0"]
    sidecar.write_text(json.dumps(record))
    with pytest.raises(FileExistsError, match="other settings"):
        fastdae.sample(run_dir, 8, out, progress=False)


def test_random_labels_are_seeded_and_cover_the_classes():
    a = sampling.sample_labels(400, 4, "random", seed=3)
    assert torch.equal(a, sampling.sample_labels(400, 4, "random", seed=3))
    assert set(a.tolist()) == {0, 1, 2, 3} and not torch.equal(a, sampling.sample_labels(400, 4, "balanced", 3))
    assert sampling.sample_labels(10, 0, "balanced", 0) is None  # unconditional DiT
    with pytest.raises(ValueError, match="labels must be one of"):
        sampling.sample_labels(10, 4, "uniform", 0)


def test_only_the_gaps_are_generated():
    assert sampling._todo_chunks(10, [], 4) == [(0, 4), (4, 8), (8, 10)]
    assert sampling._todo_chunks(10, [(0, 3), (5, 6)], 4) == [(3, 5), (6, 10)]
    assert sampling._todo_chunks(10, [(0, 10)], 4) == []


def test_cli_sample(run_dir, tmp_path, capsys):
    out = tmp_path / "cli.npz"
    assert (
        main(
            [
                "sample",
                "--run",
                str(run_dir),
                "--num-samples",
                "6",
                "--out",
                str(out),
                "--batch-size",
                "3",
                "--labels",
                "random",
                "--seed",
                "2",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    assert str(out) in capsys.readouterr().out
    images, labels = read_npz(out)
    assert images.shape == (6, 16, 16, 3)
    assert np.array_equal(labels, sampling.sample_labels(6, 4, "random", 2).numpy())
    assert json.loads((tmp_path / "cli.npz.json").read_text())["settings"]["steps"] == 1
    # errors exit with the usage status (2, as config errors), one line on stderr, no traceback
    assert main(["sample", "--run", str(run_dir), "--num-samples", "6", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path), "--out", str(tmp_path / "x.npz")]) == 2
    assert "not a fastdae run folder" in capsys.readouterr().err


SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    import fastdae

    fastdae.sample(sys.argv[1], 22, sys.argv[2], batch_size=4, progress=False)
    assert dist.get_world_size() == 2
""")


@pytest.mark.slow
def test_torchrun_shards_match_one_process(run_dir, tmp_path):
    single = read_npz(fastdae.sample(run_dir, 22, tmp_path / "single.npz", batch_size=4, progress=False))
    (tmp_path / "script.py").write_text(SCRIPT)
    proc = torchrun(tmp_path / "script.py", run_dir, tmp_path / "ddp.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = read_npz(tmp_path / "ddp.npz")
    assert all(np.array_equal(x, y) for x, y in zip(single, ddp, strict=True))  # same batches, wherever they ran
    record = json.loads((tmp_path / "ddp.npz.json").read_text())
    assert record["world_size"] == 2 and record["samples_this_run"] == 22


def test_a_runs_prior_exports_with_what_sampling_needs(run_dir, tmp_path):
    from fastdae.integrations import load_dit, save_dit

    s = sampling.load_sampler(run_dir, torch.device("cpu"))
    prior = load_dit(save_dit(s.dit, tmp_path / "dit", s.diffusion, s.scaler))
    y = torch.arange(4) % s.num_classes
    h = s.dit.input_size
    latents = [
        p.diffusion.sample(p.dit, (4, 4, h, h), y=y, steps=2, generator=torch.Generator().manual_seed(0))
        for p in (prior, s)
    ]
    assert torch.equal(prior.scaler.denormalize(latents[0]), s.scaler.denormalize(latents[1]))


def test_a_moved_run_samples_and_a_stale_or_unfinished_one_is_refused(run_dir, tmp_path, capsys):
    """The folder is read where it is now (config.yaml names where it was trained); its prior and final
    decoder must have finished and still match the encoder and the config keys they were built from."""
    from safetensors.torch import load_file, save_file

    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    images, _ = read_npz(fastdae.sample(moved, 2, tmp_path / "ok.npz", batch_size=2, progress=False))
    assert images.shape == (2, 16, 16, 3)

    encoder = moved / "stage1" / "encoder.safetensors"  # stage 1 trained again: prior and stage 2 are stale
    metrics_file, weights = moved / "stage1" / "metrics.json", load_file(encoder)
    metrics = json.loads(metrics_file.read_text())
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, encoder)
    retrained = {**metrics, "weights": {**metrics["weights"], encoder.name: sha256_file(encoder)}}
    metrics_file.write_text(json.dumps(retrained))  # what stage 1 records when it writes the file
    assert main(["sample", "--run", str(moved), "--num-samples", "2", "--out", str(tmp_path / "a.npz")]) == 2
    assert re.search(r"stage2 in .* is stale.*encoder: '", capsys.readouterr().err)
    save_file(weights, encoder)
    metrics_file.write_text(json.dumps(metrics))

    cfg = apply_overrides(load_config(moved / "config.yaml"), ["prior.num_timesteps=500"])
    cfg.save(moved / "config.yaml")  # the DiT would be rebuilt with another schedule than it was trained on
    with pytest.raises(RunError, match=r"prior .* is stale.*prior.num_timesteps: 1000 -> 500"):
        sampling.load_sampler(moved, torch.device("cpu"))
    apply_overrides(cfg, ["prior.num_timesteps=1000"]).save(moved / "config.yaml")

    (moved / "prior" / "metrics.json").unlink()  # the prior stage was interrupted
    assert main(["sample", "--run", str(moved), "--num-samples", "2", "--out", str(tmp_path / "b.npz")]) == 2
    assert "prior has not finished" in capsys.readouterr().err
    assert not (tmp_path / "b.npz").exists() and not (tmp_path / "b.npz.parts").exists()


# ---- refused before anything is written, one writer per out, PNGs of a finished out ----
def _sample_args(run_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--run", str(run_dir), "--num-samples", "4", "--out", str(out), "--steps", "1", *extra]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--cfg-scale", "nan"], r"cfg_scale must be a finite number >= 0, got nan"),
        (["--cfg-scale", "inf"], r"cfg_scale must be a finite number >= 0, got inf"),
        (["--seed", str(2**64)], r"seed must be in \[0, 2\*\*63\)"),
        (["--num-samples", str(10**12)], r"1000000000000 samples of 16x16 need about .* GB"),
        (["--device", "cuda:7"], r"device='cuda:7' but torch sees \d+ CUDA device"),
    ],
)
def test_bad_sample_arguments_exit_2_in_one_line_and_write_nothing(run_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "s.npz"
    assert main(_sample_args(run_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_png_dir_on_an_already_finished_npz_writes_its_pngs(run_dir, tmp_path):
    out = fastdae.sample(run_dir, 5, tmp_path / "s.npz", batch_size=5, steps=1, progress=False)
    fastdae.sample(run_dir, 5, out, png_dir=tmp_path / "png", batch_size=2, steps=1, progress=False)
    images, _ = read_npz(out)
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert all(np.array_equal(np.asarray(Image.open(p)), im) for p, im in zip(pngs, images, strict=True))


def test_a_second_sample_on_the_same_out_is_refused_while_the_first_writes_it(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    with sampling.exclusive(out):  # what a first `fastdae sample` on this out holds while it runs
        assert main(_sample_args(run_dir, out)) == 2
        err = capsys.readouterr().err
        assert re.search(rf"another fastdae sample \(pid {os.getpid()}\) is writing .*s\.npz", err), err
        assert err.count("\n") == 1 and not out.exists() and not (tmp_path / "s.npz.parts").exists()
    assert main(_sample_args(run_dir, out)) == 0  # released: the next one writes it, and leaves no lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.npz.json"]


REFUSED_SCRIPT = textwrap.dedent("""
    import os
    import sys
    import torch
    torch.set_num_threads(1)
    from fastdae.cli import main

    code = main(["sample", "--run", sys.argv[1], "--num-samples", "4", "--out", sys.argv[2], "--steps", "1"])
    open(sys.argv[2] + ".rank" + os.environ["RANK"], "w").write(str(code))
""")


@pytest.mark.slow
def test_a_second_sample_under_torchrun_is_refused_on_every_rank(run_dir, tmp_path):
    """Rank 0 takes the lock and tells the others: no rank waits at a barrier for one that has left."""
    out = tmp_path / "s.npz"
    (tmp_path / "script.py").write_text(REFUSED_SCRIPT)
    with sampling.exclusive(out):
        proc = torchrun(tmp_path / "script.py", run_dir, out, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"s.npz.rank{r}").read_text() for r in (0, 1)] == ["2", "2"]
    assert proc.stderr.count("another fastdae sample") == 2, proc.stderr[-3000:]
    assert not out.exists() and not (tmp_path / "s.npz.parts").exists()


@pytest.mark.parametrize(
    "stage,file", [("stage1", "encoder.safetensors"), ("stage2", "decoder.safetensors"), ("prior", "dit.safetensors")]
)
def test_a_bit_flipped_encoder_final_decoder_or_dit_is_refused_naming_it(run_dir, tmp_path, capsys, stage, file):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    path = run / stage / file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # a weight's bit, past the header: the file still loads
    path.write_bytes(bytes(data))
    with pytest.raises(RunError, match=rf"{file} changed after {stage} wrote it"):
        sampling.load_sampler(run, "cpu")
    assert main(_sample_args(run, tmp_path / "s.npz")) == 2
    assert f"{file} changed after {stage} wrote it" in capsys.readouterr().err
    with pytest.raises(RunError, match=rf"{file} changed after {stage} wrote it"):  # the samples stage too
        fastdae.train(apply_overrides(load_config(run / "config.yaml"), [f"out_dir={run}", "stages=samples"]))


def test_a_deeply_nested_identity_file_is_refused_in_one_line(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "prior" / "identity.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json
    assert main(_sample_args(run, tmp_path / "s.npz")) == 2
    err = capsys.readouterr().err
    assert "identity.json is not a stage identity" in err and err.count("\n") == 1


def test_a_parts_folder_fastdae_did_not_write_is_refused_not_removed(run_dir, tmp_path, capsys):
    (tmp_path / "s.npz.parts").mkdir()
    (tmp_path / "s.npz.parts" / "mine.txt").write_text("mine")
    assert main(_sample_args(run_dir, tmp_path / "s.npz")) == 2
    assert "was not written by fastdae sample" in capsys.readouterr().err
    assert (tmp_path / "s.npz.parts" / "mine.txt").read_text() == "mine" and not (tmp_path / "s.npz").exists()
