"""`python -m fastdae`: argument parsing onto the Python API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
