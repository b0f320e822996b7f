"""benchmarks/gpu_check.sh without a GPU: the dry run collects every benchmark group of the GPU plan
and the GPU-marked tests; the markdown writer turns pytest-benchmark JSON into per-group tables."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_collects_every_group():
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run ok" in proc.stdout
    for name in ("bench_attention.py", "bench_vq.py", "bench_lpips.py", "bench_dit.py"):
        assert name in proc.stdout


def test_markdown_tables_compare_by_cuda_time():
    def bench(member: str, ms: float, **extra) -> dict:
        return {
            "group": "attention-fwd-contiguous-N1024-D72-bfloat16",
            "name": member,
            "stats": {"median": 1.0},
            "extra_info": {"member": member, "cuda_median_ms": ms, "device": "NVIDIA H100", **extra},
        }

    data = {
        "benchmarks": [
            bench("sdpa-flash", 2.0, max_err_vs_fp64=1e-3, plain_torch_err_vs_fp64=1e-3, within_2x_rule=True),
            bench("fastdae", 1.0, max_err_vs_fp64=5e-3, plain_torch_err_vs_fp64=1e-3, within_2x_rule=False),
        ]
    }
    text = _gpu_check().markdown(data, tests_rc=0, elapsed=60.0)
    assert "| fastdae | 1.000 | 2.00x | err 5.00e-03 (plain 1.00e-03, 2x rule FAIL) |" in text
    assert "| sdpa-flash | 2.000 | 1.00x |" in text and "NVIDIA H100" in text and "passed" in text
