"""VQ: nearest-code search (forward) and vector_quantize (forward + backward), fastdae vs the
reference (taming-transformers' VectorQuantizer: full N x K distance matrix + argmin), the same
reference under torch.compile (GPU), FAISS exact search (IndexFlatL2, k=1; faiss-cpu on CPU,
FAISS-GPU's GpuIndexFlatL2 on CUDA, each when installed) and vector-quantize-pytorch's
VectorQuantize when it is installed.

    pytest benchmarks/bench_vq.py --benchmark-only

Groups are `vq-nearest-N<n>-K<k>-D<d>-<dtype>` and `vq-fwdbwd-...`; compare members within a group.
GPU: N = 65,536, K = 16,384-65,536, D = 8-256 in float32 and bfloat16. CPU: smaller (the file runs
in a few minutes on 2 cores), float32, plus `cpu-sgemm-peak` (one large torch.mm) so the search's
GFLOP/s can be read against what the cores reach in the same run. extra_info: peak extra memory of
one call (bytes; not measured for FAISS), the shapes, the thread count, TFLOP/s counted as the 2 N K D flops of the
distance dot products (median and best round), and for the search the accuracy on the first
ACC_ROWS rows against float64: the fraction of rows whose chosen code is the float64 argmin, and the
largest excess distance of a chosen code over the minimum, relative to ||x||^2 + max ||c||^2.
FAISS searches a prebuilt index (its add() is outside the timed call: its best case), with as many
OpenMP threads as torch uses. On CPU the fastdae member records the instruction set its kernel ran on
(`cpu_isa`: on a CPU with AMX, D >= 16 takes the bf16 coarse pass + exact fp32 re-rank of
csrc/vq_amx.h; FASTDAE_CPU_ISA=avx512 in the environment measures the fp32 micro-kernel instead). For
the one-thread comparison with FAISS: OMP_NUM_THREADS=1 pytest benchmarks/bench_vq.py -k nearest.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import HAS_CUDA, peak_extra_memory, stat_s  # benchmarks/conftest.py (pytest puts its folder on sys.path)

from fastdae import _ext
from fastdae.kernels.vq import vector_quantize, vq_nearest

try:
    from vector_quantize_pytorch import VectorQuantize
except ImportError:  # optional: the public alternative is measured when installed
    VectorQuantize = None
try:
    import faiss
except ImportError:  # optional ([bench] extra)
    faiss = None

# (N, K, D) per device
CASES = (
    [(65536, 16384, 8), (65536, 16384, 64), (65536, 16384, 256), (65536, 65536, 32)]
    if HAS_CUDA
    else [(4096, 4096, 64), (2048, 8192, 8), (1024, 4096, 256), (4096, 1024, 32)]
)
DTYPES = [torch.float32, torch.bfloat16] if HAS_CUDA else [torch.float32]
MEMBERS = ["fastdae", "reference", "reference-compiled", "vector-quantize-pytorch"]
SEARCH_MEMBERS = MEMBERS + ["faiss", "faiss-gpu"]
BETA = 0.25
ACC_ROWS = 1024  # rows checked against float64 per search member


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
    vq = VectorQuantize(
        dim=D, codebook_size=K, commitment_weight=BETA, ema_update=False, learnable_codebook=True, rotation_trick=False
    ).to(device)
    return vq.train(train)


def _run_or_skip(fn, device: torch.device):
    """fn() once; a reference that does not fit in memory is skipped, not failed."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip("out of memory (the N x K distance matrix does not fit)")


def _group(kind: str, N: int, K: int, D: int, dtype: torch.dtype) -> str:
    return f"vq-{kind}-N{N}-K{K}-D{D}-{str(dtype).removeprefix('torch.')}"


def _time(timed, benchmark, step, member, N, K, D, dtype, peak) -> None:
    """Time step (no sync inside: timed adds one, or uses CUDA events) and record the shape, memory
    and TFLOP/s of the 2 N K D distance flops at the median (CUDA: the CUDA-event median) and best round."""
    seconds = timed(step, member=member, N=N, K=K, D=D, dtype=str(dtype), peak_extra_bytes=peak)
    flops = 2 * N * K * D
    benchmark.extra_info.update(tflops=flops / seconds / 1e12, tflops_best=flops / stat_s(benchmark, "min") / 1e12)


def _compiled(fn, device: torch.device):
    """fn under torch.compile: a GPU member (on CPU the compile time would dominate the file)."""
    if device.type != "cuda":
        pytest.skip("the torch.compile'd reference is a GPU member")
    return torch.compile(fn)


def _faiss_search(codebook: torch.Tensor, gpu: bool):
    """search(z) -> (idx (N,), sqdist (N,)) through an exact IndexFlatL2 over the codebook, k=1."""
    if faiss is None:
        pytest.skip("faiss is not installed")
    if gpu != (codebook.device.type == "cuda"):
        pytest.skip("faiss-gpu runs on CUDA tensors, faiss on CPU tensors")
    if codebook.dtype != torch.float32:
        pytest.skip("FAISS indexes float32")
    K, D = codebook.shape
    if gpu:
        if not hasattr(faiss, "StandardGpuResources"):
            pytest.skip("this faiss build has no GPU support")
        importlib.import_module("faiss.contrib.torch_utils")  # lets the GPU index take torch CUDA tensors

        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), D)
        index.add(codebook)
        return lambda z: tuple(t[:, 0] for t in index.search(z, 1)[::-1])
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(D)
    index.add(codebook.numpy())
    return lambda z: tuple(torch.from_numpy(a[:, 0]) for a in index.search(z.numpy(), 1)[::-1])


def _accuracy(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> dict:
    """Chosen codes of the first ACC_ROWS rows against the float64 argmin (see the module docstring)."""
    x64, c64 = z[:ACC_ROWS].double(), codebook.double()
    full = torch.cdist(x64, c64).square()  # (rows, K)
    chosen = full.gather(1, idx[:ACC_ROWS].to(z.device, torch.int64)[:, None])[:, 0]
    scale = x64.square().sum(1) + c64.square().sum(1).max()
    return dict(
        argmin_agree=(idx[:ACC_ROWS].to(z.device) == full.argmin(1)).double().mean().item(),
        max_rel_gap=((chosen - full.min(1).values) / scale).max().item(),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("member", SEARCH_MEMBERS)
@pytest.mark.parametrize("N, K, D", CASES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in CASES])
def test_vq_nearest(benchmark, timed, bench_device, N, K, D, member, dtype):
    benchmark.group = _group("nearest", N, K, D, dtype)
    z = torch.randn(N, D, device=bench_device, dtype=dtype)
    codebook = torch.randn(K, D, device=bench_device, dtype=dtype)
    if member == "vector-quantize-pytorch":
        vq = _vqp_module(K, D, bench_device, train=False)
        with torch.no_grad():  # the same codes as the other members, for the accuracy check
            vq.codebook = codebook.float()
        zf = z[None].float()  # (1, N, D): its codebook is float32
        search = lambda: (vq(zf)[1][0],)  # noqa: E731
    elif member in ("faiss", "faiss-gpu"):
        faiss_search = _faiss_search(codebook, gpu=member == "faiss-gpu")
        search = lambda: faiss_search(z)  # noqa: E731
    elif member == "reference-compiled":
        compiled = _compiled(taming_nearest, bench_device)
        search = lambda: compiled(z, codebook)  # noqa: E731
    else:
        search = (lambda: vq_nearest(z, codebook)) if member == "fastdae" else (lambda: taming_nearest(z, codebook))

    def step():
        with torch.no_grad():
            return search()

    idx = _run_or_skip(step, bench_device)[0]  # warm-up: JIT build / Triton compile / torch.compile
    # FAISS allocates outside torch's allocator, where neither memory counter can see it
    peak = None if "faiss" in member else _run_or_skip(lambda: peak_extra_memory(step, bench_device), bench_device)
    _time(timed, benchmark, step, member, N, K, D, dtype, peak)
    benchmark.extra_info.update(_accuracy(z, codebook, idx))
    if member == "fastdae" and bench_device.type == "cpu":  # which kernel ran (csrc/cpu_dispatch.h)
        benchmark.extra_info.update(cpu_isa=_ext.cpu_isa(), amx_path=_ext.cpu_isa() == "amx" and D >= 16)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU FLOP/s yardstick of the vq-nearest groups")
def test_cpu_sgemm_peak(benchmark, record):
    """One large fp32 matmul (MKL): what the cores reach on dense FMA work, next to the search rates."""
    benchmark.group = "cpu-sgemm-peak"
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    benchmark(torch.mm, a, b)
    record(
        member="torch.mm",
        M=n,
        N=n,
        K=n,
        tflops=2 * n**3 / stat_s(benchmark) / 1e12,
        tflops_best=2 * n**3 / stat_s(benchmark, "min") / 1e12,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("N, K, D", CASES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in CASES])
def test_vector_quantize_fwd_bwd(benchmark, timed, bench_device, N, K, D, member, dtype):
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
        fn = {"fastdae": vector_quantize, "reference": taming_vector_quantize}.get(member)
        fn = fn or _compiled(taming_vector_quantize, bench_device)
        params = (z, codebook)
        quantize = lambda: (lambda q, _i, loss: (q, loss))(*fn(z, codebook, BETA))  # noqa: E731

    def step():
        z_q, loss = quantize()
        return torch.autograd.grad((z_q * upstream).sum() + loss, params)

    _run_or_skip(step, bench_device)
    peak = _run_or_skip(lambda: peak_extra_memory(step, bench_device), bench_device)
    _time(timed, benchmark, step, member, N, K, D, dtype, peak)
