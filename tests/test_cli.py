"""`python -m fastdae`: argument parsing onto the Python API."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastdae import cli
from fastdae.config import ConfigError, TrainConfig

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_overrides():
    assert cli.parse_overrides(["--stage2.steps", "2000", "--mode=joint", "--stages", "stage1,cache"]) == [
        "stage2.steps=2000",
        "mode=joint",
        "stages=stage1,cache",
    ]
    with pytest.raises(ConfigError, match="needs a value"):
        cli.parse_overrides(["--seed"])
    with pytest.raises(ConfigError, match="expected a --key value"):
        cli.parse_overrides(["seed", "3"])


def test_train_command_runs_the_api(tmp_path, capsys):
    cfg_file = tmp_path / "base.yaml"
    cfg_file.write_text("seed: 5\nstage1:\n  lr: 0.001\n")
    out = tmp_path / "run"
    rc = cli.main(
        [
            "train",
            "--preset",
            "tiny",
            "--config",
            str(cfg_file),
            "--out",
            str(out),
            "--stages",
            "stage1",
            "--stage1.steps",
            "2",
        ]
    )
    assert rc == 0 and f"run directory: {out}" in capsys.readouterr().out
    cfg = TrainConfig.load(out / "config.yaml")
    # preset < config file < command line
    assert cfg.seed == 5 and cfg.stage1.lr == 0.001 and cfg.stage1.steps == 2 and cfg.data.size == 16
    assert (out / "stage1" / "encoder.safetensors").is_file()


def test_unknown_override_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path), "--stage2.stepz", "3"]) == 2
    assert "unknown config key 'stage2.stepz'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,match",
    [
        (["--preset", "tinny"], "did you mean 'tiny'"),
        (["--config", "{missing}"], "missing.yaml"),
        (["--config", "{broken}"], "broken.yaml"),
        (["--config", "{invalid}"], "stage1.batch_size"),
        (["--preset", "tiny", "--stage1.steps", "0"], "stage1.steps"),
    ],
)
def test_config_errors_exit_2_without_a_traceback(tmp_path, capsys, args, match):
    files = {"missing": tmp_path / "missing.yaml", "broken": tmp_path / "broken.yaml", "invalid": tmp_path / "bad.yaml"}
    files["broken"].write_text("seed: [1\n")
    files["invalid"].write_text("stage1:\n  batch_size: 0\n")
    args = [a.format(**files) for a in args]
    assert cli.main(["train", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and err.startswith("fastdae train: ")
    assert not (tmp_path / "run").exists()


def test_refused_resume_exits_2_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    common = [
        sys.executable,
        "-m",
        "fastdae",
        "train",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--stages",
        "stage1",
        "--stage1.steps",
        "1",
    ]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    assert subprocess.run(common, capture_output=True, cwd=REPO, env=env, timeout=300).returncode == 0
    proc = subprocess.run(
        [*common, "--resume", "--seed", "3"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert proc.returncode == 2 and "seed" in proc.stderr and "Traceback" not in proc.stderr


def test_subcommands_are_registered_in_one_place(monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(
        cli.COMMANDS,
        "echo",
        ("test command", lambda p: p.add_argument("--word"), lambda args, extra: calls.append((args.word, extra)) or 0),
    )
    assert cli.main(["echo", "--word", "hi"]) == 0 and calls == [("hi", [])]


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "fastdae", "train", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0 and "--preset" in proc.stdout and "tiny" in proc.stdout


def test_module_entry_point_has_compare():
    """`python -m fastdae compare` is registered by main() itself (nothing imported by hand first)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastdae", "compare", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--arms" in proc.stdout and "--seeds" in proc.stdout and "--ablate" in proc.stdout


# ---- config and file errors are one line on stderr and exit 2 -----------------------------
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("fastdae train: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "args,match",
    [
        (["--prior.cfg_scale", "inf"], "prior.cfg_scale must be a finite number, got inf"),
        (["--stage1.lr", "inf"], "stage1.lr must be a finite number"),
        (["--stage2.weight_decay", "nan"], "stage2.weight_decay must be a finite number"),
        (["--seed", str(2**64)], "seed must be in [0, 2**63)"),
        (["--autoencoder.num_codes", "1"], "autoencoder.num_codes must be >= 2"),
    ],
)
def test_values_that_used_to_pass_validation_exit_2_in_one_line(tmp_path, capsys, args, match):
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), *args]) == 2
    assert match in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_an_out_dir_that_is_a_file_or_a_project_folder_exits_2_and_is_left_alone(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in _one_line_error(capsys) and (tmp_path / "file").read_text() == "mine"
    proj = tmp_path / "proj"
    proj.mkdir()
    TrainConfig().save(proj / "config.yaml")
    (proj / "model.py").write_text("code")
    args = ["train", "--config", str(proj / "config.yaml"), "--preset", "tiny", "--out", str(proj), "--overwrite"]
    assert cli.main(args) == 2
    assert "not a fastdae run" in _one_line_error(capsys)
    assert sorted(p.name for p in proj.iterdir()) == ["config.yaml", "model.py"]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_image_in_the_data_folder_exits_2_naming_it(tmp_path, capsys, workers):
    """Also from a DataLoader worker, whose error carries the worker's traceback in its message."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(40):
        Image.new("RGB", (16, 16), (6 * i, 0, 0)).save(data / f"{i:02d}.png")
    (data / "17.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = ["--data.name", "folder", "--data.root", str(data), "--data.size", "16", "--stages", "stage1"]
    args += ["--num_workers", str(workers), "--stage1.steps", "3", "--stage1.batch_size", "16"]
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), *args]) == 2
    err = _one_line_error(capsys)
    assert "cannot read image file" in err and "17.png" in err


def test_an_unreadable_class_folder_exits_2_naming_it(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root lists any folder")
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    (data / "b").chmod(0)
    try:
        args = ["--data.name", "folder", "--data.root", str(data), "--data.size", "16"]
        assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), *args]) == 2
        assert "cannot list" in _one_line_error(capsys)
    finally:
        (data / "b").chmod(0o755)


def test_one_line_reduces_a_worker_traceback_to_its_error():
    text = (
        "Caught ImageFileError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nfastdae.data.folder_index.ImageFileError: cannot read image file a.png: bad'
    )
    assert cli.one_line(ValueError(text)) == "cannot read image file a.png: bad"
    assert cli.one_line(PermissionError(13, "Permission denied", "/x/y")) == "/x/y: Permission denied"


def test_a_holdout_that_leaves_nothing_to_train_on_exits_2_in_one_line(tmp_path, capsys):
    root = tmp_path / "data.npz"
    np.savez(root, images=np.zeros((4, 16, 16, 3), np.uint8))
    args = ["--data.name", "array", "--data.root", str(root), "--data.size", "16", "--data.holdout", "4"]
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), *args]) == 2
    assert "holds out 4 of the dataset's 4 items and leaves none to train on" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kind,content,match",
    [
        ("folder", None, "data.root=.* must be a folder"),
        ("array", None, r"array file .*data\.npz is not a readable \.npz"),
        ("array", np.zeros((4, 16, 16, 3), np.int32), r"images must be uint8 .* got dtype int32"),
        ("array", np.zeros((4, 8, 8, 3), np.uint8), r"images are 8x8, DataConfig\.size is 16"),
    ],
)
def test_a_data_root_of_the_wrong_kind_or_unreadable_exits_2(tmp_path, capsys, kind, content, match):
    root = tmp_path / "data.npz"
    if content is None:
        root.write_bytes(b"not an array file")
    else:
        np.savez(root, images=content)
    args = ["--data.name", kind, "--data.root", str(root), "--data.size", "16"]
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), *args]) == 2
    assert re.search(match, _one_line_error(capsys))


@pytest.mark.parametrize(
    "args,match",
    [
        (["--data.num_samples", str(10**15)], r"out of memory \(Unable to allocate .* PiB"),
        (["--autoencoder.num_codes", str(10**14)], r"out of memory \(.*can't allocate memory"),
    ],
)
def test_a_size_too_large_for_memory_exits_2_in_one_line(tmp_path, capsys, args, match):
    """Sizes past the 128 TiB address space: no allocator can grant them, whatever its overcommit policy."""
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--out", str(out), "--stages", "stage1", *args]) == 2
    assert re.search(match, _one_line_error(capsys))
