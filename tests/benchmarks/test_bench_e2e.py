"""benchmarks/bench_e2e.py runs: its benchmark at quick size (the tiny preset, 2 steps a stage, both
members) and its checks that the common way's swapped-in ops compute what they stand for (the
installed taming-transformers VectorQuantizer, fastdae's LPIPS distance), in a pytest subprocess
as `pytest benchmarks/` would run it (benchmarks/conftest.py, not this folder's)."""

from __future__ import annotations

from tests.utils import REPO, run_benchmarks


def test_bench_e2e_runs_at_quick_size(tmp_path):
    proc = run_benchmarks(REPO / "benchmarks" / "bench_e2e.py", tmp_path, timeout=300, FASTDAE_BENCH_QUICK="1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "18 passed" in proc.stdout, proc.stdout[-2000:]  # 2 recipe, 2 component, 2 + 9 precision, 3 checks
