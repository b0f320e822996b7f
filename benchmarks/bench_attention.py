"""Attention forward and forward+backward: fastdae vs the reference vs every SDPA backend (flash,
cuDNN, efficient, math) and xformers when installed, in one run.

    pytest benchmarks/bench_attention.py --benchmark-only

Groups are `attention-<pass>-N<n>-D<d>-<dtype>`; compare members within a group. extra_info holds
TFLOP/s (forward 4 B H N^2 D flops, backward 2.5x that) and peak extra memory.
GPU: bf16, H = 16, B = 16384 / N, N in {256, 1024, 4096}, D in {64, 72 (DiT-XL), 128}.
CPU: fp32, B = 1, H = 4, N in {256, 1024}, D in {64, 72}; fastdae's "auto" is SDPA there (its CPU
fallback), so the CPU groups show why: the reference against SDPA's backends, not the Triton kernel.
Members a device or build does not support (e.g. cuDNN for some head dims) are skipped with the reason.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import HAS_CUDA, peak_extra_memory
from fastdae.kernels.attention import attention

if HAS_CUDA:
    SEQ_LENS, HEAD_DIMS, DTYPE, HEADS, TOKENS = [256, 1024, 4096], [64, 72, 128], torch.bfloat16, 16, 16384
else:
    SEQ_LENS, HEAD_DIMS, DTYPE, HEADS, TOKENS = [256, 1024], [64, 72], torch.float32, 4, 1024

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
MEMBERS = ["fastdae", "reference", *SDPA_BACKENDS, "xformers"]


def member_fn(member: str):
    if member == "fastdae":
        return lambda q, k, v: attention(q, k, v)
    if member == "reference":
        return lambda q, k, v: attention(q, k, v, impl="ref")
    if member == "xformers":
        if importlib.util.find_spec("xformers") is None:
            pytest.skip("xformers is not installed")
        return lambda q, k, v: attention(q, k, v, impl="xformers")
    backend = SDPA_BACKENDS[member]

    def sdpa(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return sdpa


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("N", SEQ_LENS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_attention(benchmark, record, bench_device, pass_, N, D, member):
    dtype_name = str(DTYPE).removeprefix("torch.")
    benchmark.group = f"attention-{pass_}-N{N}-D{D}-{dtype_name}"
    B = max(1, TOKENS // N)
    q, k, v = (torch.randn(B, HEADS, N, D, device=bench_device, dtype=DTYPE, requires_grad=pass_ == "fwd_bwd")
               for _ in range(3))
    grad = torch.randn(B, HEADS, N, D, device=bench_device, dtype=DTYPE)
    fn = member_fn(member)

    def step():
        out = fn(q, k, v)
        result = torch.autograd.grad(out, (q, k, v), grad) if pass_ == "fwd_bwd" else out
        _sync(bench_device)
        return result

    try:
        step()  # warm-up: Triton compile + autotune, cuDNN plans
    except RuntimeError as err:  # "No available kernel" for this backend, dtype or head dim
        pytest.skip(f"{member} does not run here: {str(err).splitlines()[0]}")
    peak = peak_extra_memory(step, bench_device)
    benchmark(step)
    flops = 4 * B * HEADS * N * N * D * (3.5 if pass_ == "fwd_bwd" else 1.0)
    record(member=member, dtype=dtype_name, B=B, H=HEADS, N=N, D=D, peak_extra_bytes=peak,
           tflops=flops / benchmark.stats.stats.mean / 1e12)
