"""The report's cases: kernel launches built by the library's own launch functions (with meta
tensors, so nothing is allocated), plus the work each does (flops, compulsory bytes, main-loop trips
and, for the per-score figures, how many scores one main-loop trip covers)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdae.kernels._launch import KernelLaunch


@dataclass
class Case:
    family: str  # "attention_fwd", "vq", ...
    shape: str  # human-readable shape
    dtype: str
    launch: KernelLaunch
    flops: float
    bytes: float
    trips: Callable[[dict], int]  # main-loop iterations of one program for a config's meta
    precision: str  # peak key: bf16 / fp16 / tf32 / 3xtf32 / ieee
    shipped: bool = True  # what impl="auto" launches on CUDA (the CI rules apply to these rows)
    # scores (attention) or (row, code) pairs (VQ) one main-loop trip of one program covers
    per_trip: Callable[[dict], int] | None = None
    narrow_ok: int = 0  # fp32 per-row vectors the main loop loads (may be narrow loads; see model.violations)
    extra_mma_flops: float = 0.0  # tensor-core work beyond `flops` (the forward's row sums as P @ ones)


def _dt(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _peak_key(dtype: str, dot_precision: str) -> str:
    return dtype if dtype in ("bf16", "fp16") else dot_precision


def _tile_scores(meta: dict) -> int:
    """Scores one main-loop trip of an attention kernel covers (the delta pre-pass has none)."""
    return meta["BLOCK_M"] * meta["BLOCK_N"] if "BLOCK_N" in meta else 0


def _trips(n: int, block: str | None) -> Callable[[dict], int]:
    """Main-loop trips of one program stepping over n rows by the config's `block` (None: no loop)."""
    return lambda meta: n // meta[block] if block else 1


def attention_cases(quick: bool = False) -> list[Case]:
    """B=8 H=16, N in {1024, 4096}, D in {64, 72, 128}, bf16, contiguous and fused-qkv. fp32 has no
    rows: impl="triton" refuses it on a GPU (attention.kernel_unsupported)."""
    shapes = itertools.product(
        (64, 72, 128), ("bf16",), ("contiguous", "fused-qkv"), (1024,) if quick else (1024, 4096)
    )
    return [case for D, dtype, layout, N in shapes for case in _attention_shape_cases(8, 16, N, D, dtype, layout)]


def _attention_shape_cases(B: int, H: int, N: int, D: int, dtype: str, layout: str) -> list[Case]:
    """The forward, Delta pre-pass, dK/dV and dQ launches at one shape."""
    from fastdae.kernels import attention as A

    dt = _dt(dtype)
    if layout == "contiguous":
        q, k, v = (torch.empty(B, H, N, D, dtype=dt, device="meta") for _ in range(3))
    else:  # what the DiT passes: views of one (B, N, 3, H, D) projection
        q, k, v = torch.empty(B, N, 3, H, D, dtype=dt, device="meta").permute(2, 0, 3, 1, 4).unbind(0)
    o = torch.empty(B, N, H, D, dtype=dt, device="meta").transpose(1, 2)
    lse = torch.empty(B, H, N, device="meta")
    do, dq, dk, dv = (torch.empty(B, H, N, D, dtype=dt, device="meta") for _ in range(4))
    launches = (A.fwd_launch(q, k, v, o, lse, D**-0.5), *A.bwd_launches(do, q, k, v, o, lse, lse, dq, dk, dv, D**-0.5))
    io_bytes = B * H * N * D * q.element_size()
    bhnmd = B * H * N * N * D
    rows = B * H * N  # entries of lse / Delta
    # per launch: family, flops, compulsory bytes, the block a main-loop trip steps N by (None: no loop),
    # narrow_ok (dK/dV: lse and Delta), extra_mma_flops (the forward's row sums as P @ ones)
    work = (
        ("attention_fwd", 4 * bhnmd, 4 * io_bytes + 4 * rows, "BLOCK_N", 0, 2 * B * H * N * N * 16),
        ("attention_bwd_delta", 2 * B * H * N * D, 2 * io_bytes, None, 0, 0),
        ("attention_bwd_dkdv", 8 * bhnmd, 6 * io_bytes + 8 * rows, "BLOCK_M", 2, 0),
        ("attention_bwd_dq", 6 * bhnmd, 5 * io_bytes + 8 * rows, "BLOCK_N", 0, 0),
    )
    peak, shipped, shape = _peak_key(dtype, A._precision(dt)), A.auto_uses_kernel(q), f"B{B} H{H} N{N} D{D} {layout}"
    return [
        Case(family, shape, dtype, launch, flops, nbytes, _trips(N, block), peak, shipped, _tile_scores, narrow, extra)
        for launch, (family, flops, nbytes, block, narrow, extra) in zip(launches, work, strict=True)
    ]


def vq_cases(quick: bool = False) -> list[Case]:
    """N=65,536 rows, K in {16,384, 65,536} codes, D in {8, 32, 256}, fp32 and bf16, search only and
    the fused vector_quantize pass (writes z_q)."""
    from fastdae.kernels import vq as V

    N = 65536
    cases = []
    for D in (8, 32, 256):
        for dtype in ("bf16", "fp32"):
            for K in (16384,) if quick else (16384, 65536):
                for write_zq in (False, True):
                    dt = _dt(dtype)
                    x = torch.empty(N, D, dtype=dt, device="meta")
                    c = torch.empty(K, D, dtype=dt, device="meta")
                    caug = torch.empty(K, 16, dtype=torch.bfloat16, device="meta")
                    xaug = torch.empty(N, 16, dtype=torch.bfloat16, device="meta")
                    csq_sum = torch.empty((), device="meta")
                    idx = torch.empty(N, dtype=torch.int64, device="meta")
                    dist = torch.empty(N, device="meta")
                    zq = torch.empty(N, D, dtype=dt, device="meta") if write_zq else None
                    plan = V.nearest_launch(x, xaug, c, caug, csq_sum, idx, dist, zq)
                    el = x.element_size()
                    nbytes = (N * D + K * D + (N * D if write_zq else 0)) * el + (K + N) * 32 + N * 12
                    prec = plan.constexprs["PRECISION"]
                    cases.append(
                        Case(
                            "vector_quantize" if write_zq else "vq_nearest",
                            f"N{N} K{K} D{D}",
                            dtype,
                            plan,
                            2 * N * K * D,
                            nbytes,
                            lambda m, K=K: -(-K // m["BLOCK_K"]),
                            _peak_key(dtype, prec),
                            per_trip=lambda m: m["BLOCK_N"] * m["BLOCK_K"],
                        )
                    )
    return cases


# VGG16 LPIPS taps at 256 px: (C, H = W)
LPIPS_LAYERS = ((64, 256), (128, 128), (256, 64), (512, 32), (512, 16))


def lpips_cases(quick: bool = False) -> list[Case]:
    """The LPIPS head over VGG16's five taps at 256 px, B=16, bf16 and fp32, forward and backward."""
    from fastdae.kernels import lpips as L

    B = 16
    cases = []
    for dtype in ("bf16", "fp32"):
        for C, S in LPIPS_LAYERS[: 2 if quick else None]:
            dt = _dt(dtype)
            f0, f1, g0, g1 = (torch.empty(B, C, S, S, dtype=dt, device="meta") for _ in range(4))
            w = torch.empty(C, device="meta")
            part = torch.empty(B, 1024, device="meta")
            grad = torch.empty(B, device="meta")
            n = B * C * S * S
            shape = f"B{B} C{C} {S}x{S}"
            el = f0.element_size()
            for family, launch, flops, nbytes in (
                ("lpips_fwd", L.fwd_launch(f0, f1, w, part), 8 * n, 2 * n * el),
                ("lpips_bwd", L.bwd_launch(grad, f0, f1, w, g0, g1, True, True), 20 * n, 4 * n * el),
            ):
                cases.append(Case(family, shape, dtype, launch, flops, nbytes, lambda m: 1, "ieee"))
    return cases


def all_cases(quick: bool = False) -> list[Case]:
    return vq_cases(quick) + attention_cases(quick) + lpips_cases(quick)


def ci_cases() -> list[Case]:
    """One shape per shipped config family, for the CI test: VQ at D 8 / 32 / 256 (every D bucket
    the report's shapes reach) in bf16 and fp32; attention at D 64, 72 (in the fused-qkv layout the
    DiT passes) and 128, one per head-width family, every kernel and config; one LPIPS layer each way.
    Build it inside `for_arch` to get a target's configs."""
    vq = [c for c in vq_cases(quick=True) if c.family == "vector_quantize"]
    attn = [
        c
        for c in attention_cases(quick=True)
        if c.shape.endswith(("D64 contiguous", "D72 fused-qkv", "D128 contiguous")) and c.shipped
    ]
    return vq + attn + lpips_cases(quick=True)[:2]
