"""Every benchmark member in benchmarks/ builds at its full configuration and runs once: `pytest
benchmarks/ --benchmark-disable` (each member called once, untimed) with FASTDAE_BENCH_SIZE=one-step
(bench_e2e's members at the full recipe's sizes for one step a stage). CI otherwise runs only the quick
sizes, which is how `common-way` at full size came to die on the vq preset's missing discriminator
unseen, and how reading pytest-benchmark's stats under --benchmark-disable broke 24 members."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_benchmark_member_runs_one_step_at_full_size(tmp_path):
    env = {**os.environ, "FASTDAE_BENCH_SIZE": "one-step", "PYTHONPATH": str(ROOT)}
    env.pop("FASTDAE_BENCH_QUICK", None)
    env.pop("TRITON_INTERPRET", None)  # the benchmarks' CPU paths are C++ / torch, as a user runs them
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(ROOT / "benchmarks"),
            "--benchmark-disable",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'pytest'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout and " error" not in proc.stdout, tail
