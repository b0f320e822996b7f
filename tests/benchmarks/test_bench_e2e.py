"""benchmarks/bench_e2e.py runs: its benchmark at quick size (the tiny preset, 2 steps a stage, both
members) and its checks that the common way's swapped-in ops compute what they stand for (the
installed taming-transformers VectorQuantizer, fastdae's LPIPS distance), in a pytest subprocess
as `pytest benchmarks/` would run it (benchmarks/conftest.py, not this folder's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_e2e_runs_at_quick_size(tmp_path):
    env = {**os.environ, "FASTDAE_BENCH_QUICK": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # the benchmark's CPU paths are C++ / torch, as a user runs them
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(ROOT / "benchmarks" / "bench_e2e.py"),
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
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "18 passed" in proc.stdout, proc.stdout[-2000:]  # 2 recipe, 2 component, 2 + 9 precision, 3 checks
