"""Benchmark helpers: device/version info, NVML telemetry, peak extra memory, GPU timing and
accuracy against float64 in extra_info.

Run: pytest benchmarks/ --benchmark-only   (add --benchmark-json=benchmarks/results/<device>-<date>.json)
On a GPU: bash benchmarks/gpu_check.sh (GPU tests, then every group timed with CUDA events).
Performance claims are ratios between members of one pytest-benchmark group, measured in one run.

FASTDAE_BENCH_DEVICE=cuda makes the files parametrize their GPU cases without a GPU: for
`pytest --collect-only` (gpu_check.sh --dry-run), never for running them.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

import pytest
import torch

HAS_CUDA = os.environ.get("FASTDAE_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu") == "cuda"


def device_info() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["allow_tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        info.update(nvml_telemetry())
    else:
        info["device"] = "cpu"
    return info


def nvml_telemetry() -> dict:
    """Clocks, temperature, power and memory of GPU 0 through nvidia-ml-py (empty when absent)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        out = {
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "driver": pynvml.nvmlSystemGetDriverVersion(),
        }
        pynvml.nvmlShutdown()
        return out
    except Exception as err:  # library missing, no driver: telemetry is optional
        return {"nvml": f"unavailable ({type(err).__name__})"}


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of fn() beyond what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events, replayed in
    order to find the high-water mark of live bytes (torch has no CPU peak counter)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for ev in sorted(allocs, key=lambda e: e.start_ns()):
        live += ev.nbytes()  # negative for frees
        peak = max(peak, live)
    return peak


def stat_s(benchmark, stat: str = "median") -> float:
    """pytest-benchmark's `stat` (median, min, ...) in seconds, or nan when timing is off
    (--benchmark-disable runs each member once, untimed: CI's full-size check)."""
    return getattr(benchmark.stats.stats, stat) if benchmark.stats else float("nan")


def cuda_time(fn: Callable[[], object]) -> dict:
    """GPU time of fn() (no host sync inside) from CUDA events via triton.testing.do_bench: the
    caller has run fn once (compile, autotune), do_bench warms up again, flushes L2 before every
    run and reports quantiles in ms."""
    from triton.testing import do_bench

    p20, median, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
    return {"cuda_median_ms": median, "cuda_p20_ms": p20, "cuda_p80_ms": p80}


def two_x_rule(out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, floor: float = 1e-6) -> dict:
    """Accuracy as flash-attention's tests judge it: max |out - ref64| against the error of plain
    torch in the same dtype (`plain`); passes when it is at most 2x that plus a small floor."""
    err = (out.double() - ref64).abs().max().item()
    plain_err = (plain.double() - ref64).abs().max().item()
    return {
        "max_err_vs_fp64": err,
        "plain_torch_err_vs_fp64": plain_err,
        "within_2x_rule": bool(err <= 2 * plain_err + floor),
    }


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def timed(benchmark, record, bench_device):
    """timed(fn, **extra) -> seconds: benchmark fn (no sync inside; one call already made as
    warm-up) and record extra. On CUDA the GPU time from CUDA events (cuda_time) goes into
    extra_info as well and is what it returns (gpu_check.sh compares members by cuda_median_ms);
    on CPU pytest-benchmark's median."""

    def _timed(fn: Callable[[], object], **extra) -> float:
        if bench_device.type == "cuda":
            extra.update(cuda_time(fn))

            def step():
                out = fn()
                torch.cuda.synchronize()
                return out
        else:
            step = fn
        benchmark(step)
        record(**extra)
        if "cuda_median_ms" in extra:
            return extra["cuda_median_ms"] / 1e3
        return stat_s(benchmark)

    return _timed


@pytest.fixture
def record(benchmark):
    """record(**extra) adds device info plus the given fields to the benchmark's extra_info."""

    def _record(**extra) -> None:
        benchmark.extra_info.update(device_info())
        benchmark.extra_info.update(extra)

    return _record
