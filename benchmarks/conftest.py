"""Benchmark helpers: device/version info, NVML telemetry and peak extra memory in extra_info.

Run: pytest benchmarks/ --benchmark-only   (add --benchmark-json=benchmarks/results/<device>-<date>.json)
Performance claims are ratios between members of one pytest-benchmark group, measured in one run.
"""
from __future__ import annotations

import platform
from typing import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


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
    if HAS_CUDA:
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
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
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
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


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def record(benchmark):
    """record(**extra) adds device info plus the given fields to the benchmark's extra_info."""

    def _record(**extra) -> None:
        benchmark.extra_info.update(device_info())
        benchmark.extra_info.update(extra)

    return _record
