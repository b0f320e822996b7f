"""VQ: nearest-code search (forward) and vector_quantize (forward + backward), fastdae vs the
reference (taming-transformers' VectorQuantizer: full N x K distance matrix + argmin) vs
vector-quantize-pytorch's VectorQuantize when it is installed.

    pytest benchmarks/bench_vq.py --benchmark-only

Groups are `vq-nearest-N<n>-K<k>-D<d>-<dtype>` and `vq-fwdbwd-...`; compare members within a group.
GPU: N = 65,536, K = 16,384-65,536, D = 8-256 in float32 and bfloat16. CPU: smaller (the file runs
in a few minutes on 2 cores), float32. extra_info: peak extra memory of one call (bytes), the
shapes, and TFLOP/s counted as the 2 N K D flops of the distance dot products.
"""
from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, peak_extra_memory  # benchmarks/conftest.py (pytest puts its folder on sys.path)
from fastdae.kernels.vq import vector_quantize, vq_nearest

try:
    from vector_quantize_pytorch import VectorQuantize
except ImportError:  # optional: the public alternative is measured when installed
    VectorQuantize = None

# (N, K, D) per device
CASES = (
    [(65536, 16384, 8), (65536, 16384, 64), (65536, 16384, 256), (65536, 65536, 32)]
    if HAS_CUDA
    else [(4096, 4096, 64), (2048, 8192, 8), (1024, 4096, 256), (4096, 1024, 32)]
)
DTYPES = [torch.float32, torch.bfloat16] if HAS_CUDA else [torch.float32]
MEMBERS = ["fastdae", "reference", "vector-quantize-pytorch"]
BETA = 0.25


def taming_nearest(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """taming-transformers' search: d = ||z||^2 + ||e||^2 - 2 z e^T materialised, then argmin."""
    d = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * torch.matmul(z, codebook.t())  # (N, K)
    idx = d.argmin(dim=1)
    return idx, d.gather(1, idx[:, None])[:, 0]


def taming_vector_quantize(z: torch.Tensor, codebook: torch.Tensor, beta: float = BETA):
    """taming-transformers' VectorQuantizer2.forward (legacy=False loss weighting swapped to ours)."""
    idx, _ = taming_nearest(z, codebook)
    z_q = torch.nn.functional.embedding(idx, codebook)
    loss = torch.mean((z_q - z.detach()) ** 2) + beta * torch.mean((z_q.detach() - z) ** 2)
    return z + (z_q - z).detach(), idx, loss


def _vqp_module(K: int, D: int, device: torch.device, train: bool):
    if VectorQuantize is None:
        pytest.skip("vector-quantize-pytorch is not installed")
    # learnable codebook (gradient-trained, like the other members), commitment weight beta
    vq = VectorQuantize(dim=D, codebook_size=K, commitment_weight=BETA, ema_update=False,
                        learnable_codebook=True, rotation_trick=False).to(device)
    return vq.train(train)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run_or_skip(fn, device: torch.device):
    """fn() once; a reference that does not fit in memory is skipped, not failed."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip("out of memory (the N x K distance matrix does not fit)")


def _group(kind: str, N: int, K: int, D: int, dtype: torch.dtype) -> str:
    return f"vq-{kind}-N{N}-K{K}-D{D}-{str(dtype).removeprefix('torch.')}"


def _record(record, benchmark, member, N, K, D, dtype, peak) -> None:
    record(member=member, N=N, K=K, D=D, dtype=str(dtype), peak_extra_bytes=peak,
           tflops=2 * N * K * D / benchmark.stats.stats.median / 1e12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("N, K, D", CASES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in CASES])
def test_vq_nearest(benchmark, record, bench_device, N, K, D, member, dtype):
    benchmark.group = _group("nearest", N, K, D, dtype)
    z = torch.randn(N, D, device=bench_device, dtype=dtype)
    codebook = torch.randn(K, D, device=bench_device, dtype=dtype)
    if member == "vector-quantize-pytorch":
        vq = _vqp_module(K, D, bench_device, train=False)
        z = z[None].float()  # (1, N, D): its codebook is float32
        search = lambda: vq(z)[1]  # noqa: E731
    else:
        search = (lambda: vq_nearest(z, codebook)) if member == "fastdae" else (lambda: taming_nearest(z, codebook))

    def step():
        with torch.no_grad():
            out = search()
        _sync(bench_device)
        return out

    _run_or_skip(step, bench_device)  # warm-up: JIT build / Triton compile
    peak = _run_or_skip(lambda: peak_extra_memory(step, bench_device), bench_device)
    benchmark(step)
    _record(record, benchmark, member, N, K, D, dtype, peak)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("N, K, D", CASES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in CASES])
def test_vector_quantize_fwd_bwd(benchmark, record, bench_device, N, K, D, member, dtype):
    benchmark.group = _group("fwdbwd", N, K, D, dtype)
    z = torch.randn(N, D, device=bench_device, dtype=dtype, requires_grad=True)
    codebook = torch.randn(K, D, device=bench_device, dtype=dtype, requires_grad=True)
    upstream = torch.randn(N, D, device=bench_device, dtype=dtype)
    if member == "vector-quantize-pytorch":
        vq = _vqp_module(K, D, bench_device, train=True)
        z = torch.randn(1, N, D, device=bench_device, requires_grad=True)
        upstream, params = upstream[None].float(), (z, *vq.parameters())
        quantize = lambda: (lambda q, _i, loss: (q, loss))(*vq(z))  # noqa: E731
    else:
        fn = vector_quantize if member == "fastdae" else taming_vector_quantize
        params = (z, codebook)
        quantize = lambda: (lambda q, _i, loss: (q, loss))(*fn(z, codebook, BETA))  # noqa: E731

    def step():
        z_q, loss = quantize()
        grads = torch.autograd.grad((z_q * upstream).sum() + loss, params)
        _sync(bench_device)
        return grads

    _run_or_skip(step, bench_device)
    peak = _run_or_skip(lambda: peak_extra_memory(step, bench_device), bench_device)
    benchmark(step)
    _record(record, benchmark, member, N, K, D, dtype, peak)
