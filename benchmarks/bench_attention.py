"""Attention forward and forward+backward: fastdae vs the reference vs every SDPA backend (flash,
cuDNN, efficient, math), FlexAttention and xformers when installed, in one run.

    pytest benchmarks/bench_attention.py --benchmark-only

Groups are `attention-<pass>-<layout>-N<n>-D<d>-<dtype>`; compare members within a group.
extra_info: TFLOP/s (forward 4 B H N^2 D flops, backward 2.5x that), peak extra memory, and the
output's error against a float64 reference next to plain torch's in the same dtype (the 2x rule).
GPU: bf16, H = 16, B = 16384 / N, N in {1024, 4096}, D in {64, 72 (DiT-XL), 128}, contiguous
(B, H, N, D); the fused-qkv layout the DiT passes (views of one (B, N, 3, H, D) projection) at
N = 1024, D in {72, 128}; fp32 at N = 1024, D in {64, 72} with fastdae's Triton kernel forced
(auto runs SDPA for fp32). FlexAttention (torch.compile'd, compiled once per shape) at N = 1024, D = 72.
CPU: fp32, B = 1, H = 4, N in {256, 1024}, D in {64, 72}; fastdae's "auto" is SDPA there (its CPU
fallback), so the CPU groups show why: the reference against SDPA's backends, not the Triton kernel.
Members a device or build does not support (e.g. cuDNN for some head dims) are skipped with the reason.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, peak_extra_memory, two_x_rule
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdae.kernels.attention import attention, attention_ref

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
# (pass, layout, N, D, dtype, members) per group
if HAS_CUDA:
    HEADS, TOKENS = 16, 16384
    MEMBERS = ["fastdae", "reference", *SDPA_BACKENDS, "flex", "xformers"]
    FAST = ["fastdae", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "xformers"]
    GROUPS = [
        # FlexAttention compiles per shape (tens of seconds each): measured at DiT-XL's N=1024, D=72 only
        *(
            (p, "contiguous", N, D, torch.bfloat16, [m for m in MEMBERS if m != "flex" or (N, D) == (1024, 72)])
            for p in ("fwd", "fwd_bwd")
            for N in (1024, 4096)
            for D in (64, 72, 128)
        ),
        *((p, "fused-qkv", 1024, D, torch.bfloat16, FAST) for p in ("fwd", "fwd_bwd") for D in (72, 128)),
        # fp32: impl="triton" refuses it on a GPU (its dots would run on CUDA cores); auto runs SDPA
        *(
            (p, "contiguous", 1024, D, torch.float32, ["fastdae", "sdpa-efficient", "sdpa-math"])
            for p in ("fwd", "fwd_bwd")
            for D in (64, 72)
        ),
    ]
else:
    HEADS, TOKENS = 4, 1024
    MEMBERS = ["fastdae", "reference", *SDPA_BACKENDS, "xformers"]
    GROUPS = [
        (p, "contiguous", N, D, torch.float32, MEMBERS)
        for p in ("fwd", "fwd_bwd")
        for N in (256, 1024)
        for D in (64, 72)
    ]
CASES = [(p, layout, N, D, dtype, m) for p, layout, N, D, dtype, members in GROUPS for m in members]


def _case_id(case) -> str:
    p, layout, N, D, dtype, member = case
    return f"{p}-{layout}-N{N}-D{D}-{str(dtype).removeprefix('torch.')}-{member}"


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def member_fn(member: str):
    if member == "fastdae":
        return lambda q, k, v: attention(q, k, v)
    if member == "fastdae-triton":
        return lambda q, k, v: attention(q, k, v, impl="triton")
    if member == "reference":
        return lambda q, k, v: attention(q, k, v, impl="ref")
    if member == "xformers":
        if importlib.util.find_spec("xformers") is None:
            pytest.skip("xformers is not installed")
        return lambda q, k, v: attention(q, k, v, impl="xformers")
    if member == "flex":
        return lambda q, k, v: _flex()(q, k, v)
    backend = SDPA_BACKENDS[member]

    def sdpa(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return sdpa


def make_qkv(B: int, H: int, N: int, D: int, dtype: torch.dtype, layout: str, device: torch.device, grad: bool):
    """q, k, v (B, H, N, D): contiguous, or views of one (B, N, 3, H, D) tensor (DiT's fused qkv)."""
    if layout == "fused-qkv":
        qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype, requires_grad=grad)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0), (qkv,)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
    return (q, k, v), (q, k, v)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attention(benchmark, timed, bench_device, case):
    pass_, layout, N, D, dtype, member = case
    dtype_name = str(dtype).removeprefix("torch.")
    benchmark.group = f"attention-{pass_}-{layout}-N{N}-D{D}-{dtype_name}"
    B = max(1, TOKENS // N)
    (q, k, v), leaves = make_qkv(B, HEADS, N, D, dtype, layout, bench_device, grad=pass_ == "fwd_bwd")
    grad = torch.randn(B, HEADS, N, D, device=bench_device, dtype=dtype)
    fn = member_fn(member)

    def step():
        out = fn(q, k, v)
        return torch.autograd.grad(out, leaves, grad) if pass_ == "fwd_bwd" else out

    try:
        step()  # warm-up: Triton compile + autotune, cuDNN plans, FlexAttention compile
    except RuntimeError as err:  # "No available kernel" for this backend, dtype or head dim
        pytest.skip(f"{member} does not run here: {str(err).splitlines()[0]}")
    with torch.no_grad():  # accuracy of the output vs float64, next to plain torch in this dtype
        accuracy = two_x_rule(fn(q, k, v), attention_ref(q.double(), k.double(), v.double()), attention_ref(q, k, v))
    peak = peak_extra_memory(step, bench_device)
    flops = 4 * B * HEADS * N * N * D * (3.5 if pass_ == "fwd_bwd" else 1.0)
    seconds = timed(
        step, member=member, layout=layout, dtype=dtype_name, B=B, H=HEADS, N=N, D=D, peak_extra_bytes=peak, **accuracy
    )
    benchmark.extra_info["tflops"] = flops / seconds / 1e12
