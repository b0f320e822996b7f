"""Every script in examples/ runs on CPU as the README shows it (`python examples/<name>.py`).

Each example checks its own claim (same outputs, codes or gradients as the code it replaces) with
asserts and ends by printing a line starting with "ok"; one whose optional third-party package is
missing prints "skipped: ..." and exits 0, which is reported here as a skip with that reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_examples_exist():
    assert len(EXAMPLES) >= 5, [p.name for p in EXAMPLES]


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # a user's environment: CPU tensors take the C++ / torch paths
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=script.parents[1], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if last.startswith("skipped:"):
        pytest.skip(f"{script.name}: {last}")
    assert last.startswith("ok"), f"{script.name} did not report ok:\n{proc.stdout}"
