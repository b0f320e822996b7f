"""Every benchmark member in benchmarks/ builds at its full configuration and runs once: `pytest
benchmarks/ --benchmark-disable` (each member called once, untimed) with FASTDAE_BENCH_SIZE=one-step
(bench_e2e's members at the full recipe's sizes for one step a stage). CI otherwise runs only the quick
sizes, which is how `common-way` at full size came to die on the vq preset's missing discriminator
unseen, and how reading pytest-benchmark's stats under --benchmark-disable broke 24 members."""

from __future__ import annotations

import pytest

from tests.utils import REPO, run_benchmarks


@pytest.mark.slow
def test_every_benchmark_member_runs_one_step_at_full_size(tmp_path):
    proc = run_benchmarks(REPO / "benchmarks", tmp_path, timeout=900, FASTDAE_BENCH_SIZE="one-step")
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout and " error" not in proc.stdout, tail
