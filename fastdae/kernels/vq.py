"""Vector quantization (van den Oord et al., NeurIPS 2017): nearest-code search and the VQ-VAE
quantizer with its straight-through gradient and loss, fused.

For x (N, D) and a codebook c (K, D):

    idx[n]    = argmin_k ||x_n - c_k||^2 = argmin_k (||c_k||^2 - 2 x_n . c_k)     ties: the lowest k
    sqdist[n] = ||x_n - c_idx[n]||^2          (recomputed from the difference: no cancellation)

vector_quantize(z, c, beta) with z_q = c[idx] (VQ-VAE convention; sg = stop-gradient):

    z_q (returned)  = c[idx], with the straight-through gradient dL/dz += dL/dz_q
    loss            = ||sg[z] - z_q||^2 + beta ||z - sg[z_q]||^2      (both means over N*D elements)
    dloss/dz        = 2 beta (z - z_q) / (N D)                         (commitment term)
    dloss/dc_k      = 2 / (N D) sum_{n: idx[n] = k} (c_k - z_n)         (codebook term, via index_add)

The kernels never build the N x K distance matrix: a program owns a block of rows and streams the
codebook in tiles. The argmin costs one LOP3 and one integer min per (row, code) pair:

- the MMA produces s = x.c - ||c||^2 / 2 - ||x||^2 / 2 - margin = -(||x - c||^2 / 2 + margin): the
  squared norms enter as 16 extra K columns, [1, 1, 1, h, m, l, 0...] per x row against
  [h', m', l', 1, 1, 1, 0...] per code (h + m + l: an fp32 value as three exact bf16 pieces; built
  on the host, row_aug / code_aug), in one extra bf16 MMA. The margin (2^-16 ||x||^2 + 1e-30, far
  above the MMA's rounding of the sum) makes every real score negative, and codes past K score +0;
- a negative float's bits read as an int32 grow with its magnitude, so the nearest code has the
  smallest int; its lowest SEG_BITS = 5 bits are replaced by the tile's index within a segment of 32
  tiles, and one integer min per pair keeps (score, lowest tile) together;
- after each segment the per-(row, lane) keys fold into a per-row (key, code index): the lowest key,
  its lowest lane, and only a strictly smaller score from a later segment, so ties keep the lowest
  index. The packing drops 5 of the score's 24 bits (a relative 2^-18 of the distance, below the
  fp32 rounding of ||c||^2 - 2 x.c at any distance that is not ~1e-5 of the norms).

Dot products accumulate in fp32 for fp32/bf16/fp16 inputs (fp32 as three TF32 tensor-core products
on a GPU, its x split once per program). Launch configs per (GPU architecture, D, dtype) come from
the static kernel report (fastdae/kernel_report/); row strides that are multiples of 16 bytes get
tl.multiple_of hints. The Triton forward of vector_quantize also gathers z_q and the exact distances
in the same pass (the loss is a sum of those distances), so it is one kernel launch.
The backward is O(N D) elementwise work plus an index_add, next to the O(N K D) search: it is
written in torch (a fused kernel would not pay).

File order: Triton kernel -> launchers -> ops (reference and fake kernels, autograd) -> *_ref -> public
functions.

Length (~580 lines, over the package's ~400): one op pair is one file in the house order above; the
kernel calls pass ~25 arguments.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdae.kernels._common import KERNEL_DTYPES, check_tensors, define_op, dot, interpreted, on_device, precision
from fastdae.kernels._dispatch import route, triton_interpret
from fastdae.kernels._launch import KernelLaunch, LaunchConfig, align_elems, arch_of, configs, launch, strides

_CPP = "vq"  # csrc/vq.cpp: the CPU kernels of both ops
_REF_CHUNK_ELEMS = 1 << 22  # the reference scores row chunks of at most this many (row, code) pairs
# torch.compile evaluates the backend choice once at trace time instead of tracing the C++ loader
_route = torch.compiler.assume_constant_result(route)


class VQOutput(NamedTuple):
    z_q: Tensor  # z's shape and dtype: the chosen codes, straight-through gradient to z
    indices: Tensor  # int64, z.shape[:-1]
    loss: Tensor  # () float32: ||sg[z] - z_q||^2 + beta ||z - sg[z_q]||^2, means over elements


# ---------------------------------------------------------------------------------------------
# Triton kernel: program i owns rows i*BLOCK_N ... and sweeps all K codes in BLOCK_K tiles.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _split_tf32(a, PRECISION: tl.constexpr):
    """(hi, lo) with a = hi + lo exactly: hi keeps TF32's 10 mantissa bits (truncated), lo the rest
    (PRECISION "3xtf32"); for other precisions (a, a), lo unused."""
    if PRECISION == "3xtf32":
        hi = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        lo = a - hi
    else:
        hi = a
        lo = a
    return hi, lo


@triton.jit
def _x_dot_c(x_hi, x_lo, ct, acc, PRECISION: tl.constexpr):
    """acc + x @ c^T. "3xtf32": hi.hi + lo.hi + hi.lo on TF32 tensor cores (error ~2^-21 relative,
    fp32 class), from an x split once per program and a codebook tile split once per tile."""
    if PRECISION == "3xtf32":
        c_hi, c_lo = _split_tf32(ct, PRECISION)
        acc = tl.dot(x_lo, c_hi, acc, input_precision="tf32")  # small terms first
        acc = tl.dot(x_hi, c_lo, acc, input_precision="tf32")
        acc = tl.dot(x_hi, c_hi, acc, input_precision="tf32")
    else:
        acc = dot(x_hi, ct, acc, PRECISION)
    return acc


@triton.jit
def _scan_tile(seg_key, x_hi, x_lo, x_aug, x_rows, row_mask, c_ptr, caug_ptr, k0, tile_in_seg, K, sxd,
        sck, scd, D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
        SEG_BITS: tl.constexpr, PRECISION: tl.constexpr, AUG_PRECISION: tl.constexpr,
        LOP3: tl.constexpr, MASK_K: tl.constexpr):  # fmt: skip
    """Codes k0 ... k0 + BLOCK_K into the running minimum key of each (row, lane) of the segment:
    one LOP3 and one integer min per (row, code) pair. The MMA itself produces
    x.c - ||c||^2 / 2 - ||x||^2 / 2 - margin = -(||x - c||^2 / 2 + margin) < 0 (the squared norms
    enter as bf16 pieces in 16 extra columns, see the module docstring), so the score's fp32 bits
    read as an int32 order the codes (a smaller int is a nearer code) and its lowest SEG_BITS bits
    can carry the tile's index in the segment: ties of the rest keep the lower tile.
    MASK_K: the tail tile (codes past K load as zeros: score +0.0, never below a real code's)."""
    codes = k0 + tl.arange(0, BLOCK_K)
    code_mask = codes < K
    d = tl.arange(0, BLOCK_D)
    a = tl.arange(0, 16)
    c_cols = c_ptr + codes.to(tl.int64)[None, :] * sck  # (1, BLOCK_K): the tile is loaded as c^T
    if MASK_K:
        caug = tl.load(caug_ptr + codes[None, :] * 16 + a[:, None], mask=code_mask[None, :], other=0.0)
    else:
        caug = tl.load(caug_ptr + codes[None, :] * 16 + a[:, None])
    dots = dot(x_aug, caug, None, AUG_PRECISION)  # (BLOCK_N, BLOCK_K): -(||c||^2 + ||x||^2) / 2 - margin
    if D_CHUNKS == 1:
        if MASK_K:
            ct = tl.load(c_cols + d[:, None] * scd, mask=(d < D)[:, None] & code_mask[None, :], other=0.0)
        else:
            ct = tl.load(c_cols + d[:, None] * scd, mask=(d < D)[:, None], other=0.0)
        dots = _x_dot_c(x_hi, x_lo, ct, dots, PRECISION)
    else:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + d
            xc = tl.load(x_rows + dd[None, :] * sxd, mask=row_mask[:, None] & (dd < D)[None, :], other=0.0)
            ct = tl.load(c_cols + dd[:, None] * scd, mask=(dd < D)[:, None] & code_mask[None, :], other=0.0)
            xc_hi, xc_lo = _split_tf32(xc, PRECISION)
            dots = _x_dot_c(xc_hi, xc_lo, ct, dots, PRECISION)
    bits = dots.to(tl.int32, bitcast=True)
    if LOP3:  # one LOP3 per pair: ptxas splits the and/or when the tile index sits in a uniform register
        tl.static_assert(SEG_BITS == 5, "the lop3 mask below is ~(2^5 - 1)")
        key = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, -32, $2, 0xEA;",  # (a & b) | c
            "=r,r,r",
            [bits, tl.zeros_like(bits) + tile_in_seg],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:  # the interpreter runs no PTX
        key = (bits & -(1 << SEG_BITS)) | tile_in_seg
    return tl.minimum(seg_key, key)


@triton.jit
def _fold(run_key, run_code, seg_key, tile0, BLOCK_K: tl.constexpr, SEG_BITS: tl.constexpr):
    """A finished segment (tiles tile0 ...) into each row's running (key, code index): the segment's
    lowest key per row (its lowest tile among equal scores), its lowest lane among equal keys, and a
    strictly smaller score only, so an earlier segment (lower codes) keeps a tie. Once per 2^SEG_BITS
    tiles: the sweep itself holds only the per-(row, lane) keys."""
    keep = -(1 << SEG_BITS)
    lanes = tl.arange(0, BLOCK_K)
    m = tl.min(seg_key, axis=1)
    lane = tl.min(tl.where(seg_key == m[:, None], lanes[None, :], BLOCK_K), axis=1)
    code = (tile0 + (m & ~keep)) * BLOCK_K + lane
    better = (m & keep) < (run_key & keep)
    return tl.where(better, m, run_key), tl.where(better, code, run_code)


@triton.jit
def _vq_nearest_fwd_kernel(x_ptr, xaug_ptr, c_ptr, caug_ptr, csq_sum_ptr, idx_ptr, dist_ptr, zq_ptr, N,
        K, sxn, sxd, sck, scd, szn, szd, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, SEG_BITS: tl.constexpr, PRECISION: tl.constexpr,
        AUG_PRECISION: tl.constexpr, LOP3: tl.constexpr, WRITE_ZQ: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    if ALIGN > 1:  # row strides are multiples of 16 bytes (launcher-checked): vector loads of rows.
        # Hints attach to an op's result, not to a kernel argument: widen first (offsets are int64)
        sxn = tl.multiple_of(sxn.to(tl.int64), ALIGN)
        sck = tl.multiple_of(sck.to(tl.int64), ALIGN)
        szn = tl.multiple_of(szn.to(tl.int64), ALIGN)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * sxn  # (BLOCK_N, 1)
    d = tl.arange(0, BLOCK_D)
    if D_CHUNKS == 1:  # the whole x tile (and its TF32 split) stays resident for the sweep
        x = tl.load(x_rows + d[None, :] * sxd, mask=row_mask[:, None] & (d < D)[None, :], other=0.0)
    else:  # unused: _scan_tile loads x chunk by chunk
        x = tl.zeros((BLOCK_N, BLOCK_D), x_ptr.dtype.element_ty)
    x_hi, x_lo = _split_tf32(x, PRECISION)
    # loaded, not built here: both MMAs then take their A operand from shared memory in one layout
    a = tl.arange(0, 16)
    x_aug = tl.load(xaug_ptr + rows.to(tl.int64)[:, None] * 16 + a[None, :], mask=row_mask[:, None], other=0.0)
    int_max = 2147483647
    run_key = tl.full((BLOCK_N,), int_max, tl.int32)
    run_code = tl.zeros((BLOCK_N,), tl.int32)
    seg = 1 << SEG_BITS
    n_full = K // BLOCK_K
    for t0 in range(0, n_full, seg):  # segments of 2^SEG_BITS full tiles: no code masks
        seg_key = tl.full((BLOCK_N, BLOCK_K), int_max, tl.int32)
        for t in range(t0, tl.minimum(t0 + seg, n_full)):
            # fmt: off
            seg_key = _scan_tile(seg_key, x_hi, x_lo, x_aug, x_rows, row_mask, c_ptr, caug_ptr, t * BLOCK_K, t - t0, K,
                                 sxd, sck, scd, D, BLOCK_K, BLOCK_D, D_CHUNKS, SEG_BITS, PRECISION, AUG_PRECISION, LOP3,
                                 False)
            # fmt: on
        run_key, run_code = _fold(run_key, run_code, seg_key, t0, BLOCK_K, SEG_BITS)
    if n_full * BLOCK_K < K:  # the tail tile, a segment of its own
        seg_key = tl.full((BLOCK_N, BLOCK_K), int_max, tl.int32)
        # fmt: off
        seg_key = _scan_tile(seg_key, x_hi, x_lo, x_aug, x_rows, row_mask, c_ptr, caug_ptr, n_full * BLOCK_K, 0, K, sxd,
                             sck, scd, D, BLOCK_K, BLOCK_D, D_CHUNKS, SEG_BITS, PRECISION, AUG_PRECISION, LOP3, True)
        # fmt: on
        run_key, run_code = _fold(run_key, run_code, seg_key, n_full, BLOCK_K, SEG_BITS)
    # in range even when every score is NaN (a non-finite codebook, whose distances are NaN below)
    best_idx = tl.minimum(run_code, K - 1)
    # epilogue: gather the chosen codes, the exact distance ||x - c_idx||^2 and (optionally) z_q;
    # sum_k ||c_k||^2 is NaN/inf iff some code is non-finite (or overflows): then every distance is NaN
    c_rows = c_ptr + best_idx.to(tl.int64)[:, None] * sck
    dist = tl.zeros((BLOCK_N,), tl.float32) + tl.load(csq_sum_ptr) * 0.0
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + d
        mask = row_mask[:, None] & (dd < D)[None, :]
        code = tl.load(c_rows + dd[None, :] * scd, mask=mask, other=0.0)
        diff = tl.load(x_rows + dd[None, :] * sxd, mask=mask, other=0.0).to(tl.float32) - code.to(tl.float32)
        dist += tl.sum(diff * diff, axis=1)
        if WRITE_ZQ:
            tl.store(zq_ptr + rows.to(tl.int64)[:, None] * szn + dd[None, :] * szd, code, mask=mask)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_mask)
    tl.store(dist_ptr + rows, dist, mask=row_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# (BLOCK_N, BLOCK_K, largest BLOCK_D, num_warps, num_stages) per GPU architecture, for D up to the
# key's bound, bf16/fp16 or fp32, read off the static kernel report (benchmarks/results/
# kernel-report-*): no spills, then the smallest modelled time. BLOCK_D = next power of two >= D
# (>= 16), capped: below the cap x (and its TF32 split) is resident for the whole sweep. 128 x 128
# tiles give each thread 64 (row, code) pairs per trip, which brings the loop's fixed cost (loads,
# barriers, wgmma fences) to ~1.2 instructions per pair next to the packed argmin's 2. fp32 at
# D = 256 sweeps D in 64-wide chunks on mma.sync: a resident x_hi + x_lo (128 KB for 64 rows) spills
# at every tile that leaves shared memory for the codebook's.
_CONFIGS: dict[int, dict[tuple[int, bool], tuple[int, int, int, int, int]]] = {
    90: {  # (max D, fp32): config
        (32, False): (128, 128, 32, 8, 3),
        (128, False): (64, 128, 128, 8, 3),
        (256, False): (64, 128, 256, 8, 2),
        (32, True): (128, 128, 32, 8, 3),
        (128, True): (128, 64, 128, 8, 3),
        (256, True): (32, 64, 64, 4, 3),
    },
    80: {
        (32, False): (128, 128, 32, 8, 3),
        (128, False): (64, 128, 128, 8, 3),
        (256, False): (64, 64, 256, 8, 3),
        (32, True): (128, 64, 32, 8, 3),
        (128, True): (128, 64, 128, 8, 3),
        (256, True): (32, 64, 64, 4, 3),
    },
}


def launch_configs(N: int, D: int, dtype: torch.dtype, arch: int) -> tuple[LaunchConfig, ...]:
    """The search's config for N rows of width D on a GPU architecture (10 * major + minor; sm_90
    and newer get sm_90's table): block sizes are powers of two (tl.dot dims >= 16)."""
    fp32 = dtype == torch.float32
    table = _CONFIGS[90 if arch >= 90 else 80]
    head = min((h for h, f in table if f == fp32 and D <= h), default=max(h for h, _ in table))
    block_n, block_k, max_block_d, warps, stages = table[(head, fp32)]
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    block_d = max(16, min(triton.next_power_of_2(D), max_block_d))
    meta = dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, D_CHUNKS=triton.cdiv(D, block_d))
    return configs([(meta, warps, stages)])


def _precision(dtype: torch.dtype) -> str:
    """How the kernel multiplies. On a GPU: fp32 as three TF32 products (~fp32 accuracy on tensor
    cores; plain TF32's 10-bit mantissa flips the argmin between close codes). The interpreter
    multiplies with numpy, whose rounding differs between identical columns of one matmul, so the
    3-product sum can split exact ties there: it runs one IEEE fp32 product instead (the split is
    tested on its own in tests/kernels/test_vq.py)."""
    return precision(dtype, fp32="ieee" if triton_interpret() else "3xtf32")


SEG_BITS = 5  # tiles per segment = 32: a score keeps 18 of its 23 mantissa bits inside a segment


def _aug_rows(half_sq: Tensor, ones_first: bool) -> Tensor:
    """(n, 16) bf16 rows holding v = half_sq (n,) fp32 exactly as three bf16 pieces (24 mantissa
    bits) next to three ones: [1, 1, 1, h, m, l, 0, ...] or [h, m, l, 1, 1, 1, 0, ...]. The MMA of an x
    row of one kind with a code row of the other adds v_x + v_c to the score."""
    hi = half_sq.to(torch.bfloat16)
    rest = half_sq - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    rows = torch.zeros(half_sq.shape[0], 16, device=half_sq.device, dtype=torch.bfloat16)
    pieces, ones = (slice(3, 6), slice(0, 3)) if ones_first else (slice(0, 3), slice(3, 6))
    rows[:, pieces] = torch.stack((hi, mid, lo), dim=1)
    rows[:, ones] = 1.0
    return rows


def code_aug(codebook: Tensor) -> tuple[Tensor, Tensor]:
    """(caug (K, 16) bf16 with -||c||^2 / 2 in pieces, csq_sum () fp32): sum_k ||c_k||^2 flags a
    non-finite codebook (NaN distances). Once per call."""
    half = codebook.float().square().sum(dim=1) * -0.5  # (K,)
    return _aug_rows(half, ones_first=False), half.sum() * -2.0


def row_aug(x: Tensor) -> Tensor:
    """(N, 16) bf16 with -(||x||^2 / 2 + margin) in pieces. The margin (2^-16 ||x||^2 + 1e-30, far
    above the MMA's rounding of the sum, far below a gap that matters) makes every score negative."""
    sq = x.float().square().sum(dim=1)
    return _aug_rows(-(sq * (0.5 + 2.0**-16) + 1e-30), ones_first=True)


def nearest_launch(
    x: Tensor,
    xaug: Tensor,
    codebook: Tensor,
    caug: Tensor,
    csq_sum: Tensor,
    idx: Tensor,
    dist: Tensor,
    z_q: Tensor | None,
) -> KernelLaunch:
    """The search launch: x (N, D) with xaug from row_aug, codebook (K, D) with caug and csq_sum from
    code_aug ->
    idx (N,) int64, dist (N,) fp32, and codebook[idx] into z_q (N, D) when given."""
    N, D = x.shape
    zq, zq_strides = (z_q, strides(z_q)) if z_q is not None else (dist, (0, 0))
    aligned = align_elems(x, codebook, *((z_q,) if z_q is not None else ()))
    return KernelLaunch(
        _vq_nearest_fwd_kernel,
        (
            x,
            xaug,
            codebook,
            caug,
            csq_sum,
            idx,
            dist,
            zq,
            N,
            codebook.shape[0],
            *strides(x),
            *strides(codebook),
            *zq_strides,
        ),
        dict(
            D=D,
            SEG_BITS=SEG_BITS,
            PRECISION=_precision(x.dtype),
            AUG_PRECISION=precision(torch.bfloat16, fp32="tf32"),
            LOP3=not triton_interpret(),
            WRITE_ZQ=z_q is not None,
            ALIGN=aligned,
        ),
        launch_configs(N, D, x.dtype, arch_of(x)),
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),),
    )


def _nearest_triton(x: Tensor, codebook: Tensor, z_q: Tensor | None) -> tuple[Tensor, Tensor]:
    """(idx (N,) int64, sqdist (N,) fp32); also writes codebook[idx] into z_q (N, D) when given.
    A non-finite codebook (or ||c||^2 overflowing fp32) makes every sqdist NaN: checked in the
    kernel, so no host sync."""
    N = x.shape[0]
    idx = torch.empty(N, device=x.device, dtype=torch.int64)
    dist = torch.empty(N, device=x.device, dtype=torch.float32)
    caug, csq_sum = code_aug(codebook)
    with on_device(x):
        launch(nearest_launch(x, row_aug(x), codebook, caug, csq_sum, idx, dist, z_q))
    return idx, dist


def _vector_quantize_triton(z: Tensor, codebook: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """z (N, D) -> (z_q (N, D), idx (N,), loss ()): the search also gathers z_q, in one launch."""
    z_q = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    idx, dist = _nearest_triton(z, codebook, z_q)
    return z_q, idx, _loss(dist, beta, z.numel())


def _loss(sqdist: Tensor, beta: float, numel: int) -> Tensor:
    """(1 + beta) * mean ||z - z_q||^2: both loss terms have the value of the distance sum."""
    return sqdist.sum() * ((1.0 + beta) / max(numel, 1))


# ---------------------------------------------------------------------------------------------
# The ops (kernels/_common.py: define_op): CUDA runs the Triton launchers above, CPU the C++ kernels
# of csrc/vq.cpp, any other device (and the CPU without the C++ extension) the reference kernels
# here. Backward formulas are torch ops (see the module docstring).
# ---------------------------------------------------------------------------------------------
def _nearest_reference(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    idx, sqdist = vq_nearest_ref(x, codebook)
    return sqdist, idx


def _nearest_cuda(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    idx, sqdist = _nearest_triton(x, codebook, None)
    return sqdist, idx


def _vector_quantize_reference(z: Tensor, codebook: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    idx, dist = vq_nearest_ref(z, codebook)
    return codebook.index_select(0, idx), idx, _loss(dist, beta, z.numel())


def _nearest_fake(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """(sqdist (N,) float32 (float64 for the reference's float64), idx (N,) int64)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=torch.int64)


def _vector_quantize_fake(z: Tensor, codebook: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    dist, idx = _nearest_fake(z, codebook)
    return torch.empty_like(z, memory_format=torch.contiguous_format), idx, dist.new_empty(())


def _nearest_setup_context(ctx, inputs, output) -> None:
    x, codebook = inputs
    ctx.save_for_backward(x, codebook, output[1])


def _nearest_backward(ctx, grad_dist: Tensor | None, grad_idx):
    """d sqdist_n / d x_n = 2 (x_n - c_idx[n]); the same with a minus sign to c_idx[n]."""
    x, codebook, idx = ctx.saved_tensors
    if grad_dist is None:
        return None, None
    diff = (x.float() - codebook.float().index_select(0, idx)) * (2.0 * grad_dist)[:, None]  # (N, D)
    grad_x = diff.to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_c = None
    if ctx.needs_input_grad[1]:
        grad_c = torch.zeros(codebook.shape, device=x.device, dtype=torch.float32).index_add(0, idx, -diff)
        grad_c = grad_c.to(codebook.dtype)
    return grad_x, grad_c


def _vq_setup_context(ctx, inputs, output) -> None:
    z, codebook, beta = inputs
    z_q, idx, _ = output
    ctx.beta, ctx.codebook_shape, ctx.codebook_dtype = beta, codebook.shape, codebook.dtype
    # z_q rather than the codebook: the nn module may update the codebook in place after forward
    ctx.save_for_backward(z, z_q, idx)


def _vq_backward(ctx, grad_zq: Tensor | None, grad_idx, grad_loss: Tensor | None):
    z, z_q, idx = ctx.saved_tensors
    diff = z.float() - z_q.float()  # (N, D)
    scale = 2.0 * grad_loss / z.numel() if grad_loss is not None else diff.new_zeros(())
    grad_z = grad_c = None
    if ctx.needs_input_grad[0]:  # straight-through + commitment term
        commit = ctx.beta * scale
        grad_z = diff * commit if grad_zq is None else torch.addcmul(grad_zq.float(), diff, commit)
        grad_z = grad_z.to(z.dtype)
    if ctx.needs_input_grad[1]:  # codebook term: per-code sums of diff in fp32, scaled once (K, D)
        grad_c = torch.zeros(ctx.codebook_shape, device=z.device, dtype=torch.float32).index_add_(0, idx, diff)
        grad_c = (grad_c * -scale).to(ctx.codebook_dtype)
    return grad_z, grad_c, None


# x (N, D), codebook (K, D) -> (sqdist (N,) float32, idx (N,) int64): the float output first, as
# opcheck's autograd test sums the outputs in order; vq_nearest returns them the other way round
_vq_nearest_op = define_op(
    "vq_nearest(Tensor x, Tensor codebook) -> (Tensor, Tensor)",
    cuda=_nearest_cuda,
    reference=_nearest_reference,
    fake=_nearest_fake,
    backward=_nearest_backward,
    setup_context=_nearest_setup_context,
)
# z (N, D), codebook (K, D) -> (z_q (N, D), idx (N,) int64, loss () float32)
_vector_quantize_op = define_op(
    "vector_quantize(Tensor z, Tensor codebook, float beta) -> (Tensor, Tensor, Tensor)",
    cuda=_vector_quantize_triton,
    reference=_vector_quantize_reference,
    fake=_vector_quantize_fake,
    backward=_vq_backward,
    setup_context=_vq_setup_context,
)
# impl="triton" on CPU tensors under TRITON_INTERPRET=1 (tests only): the launchers, same autograd
_nearest_interpreted = interpreted(_nearest_cuda, _nearest_setup_context, _nearest_backward)
_vector_quantize_interpreted = interpreted(_vector_quantize_triton, _vq_setup_context, _vq_backward)


# ---------------------------------------------------------------------------------------------
# References and public entries
# ---------------------------------------------------------------------------------------------
def vq_nearest_ref(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Plain-torch nearest-code search: the documentation and the CPU fallback.

    Scores ||c||^2 - 2 x.c in fp32 (fp64 for fp64 inputs) over row chunks of at most
    _REF_CHUNK_ELEMS (row, code) pairs, so memory stays bounded; argmin takes the first minimum."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, cf = x.to(acc), codebook.to(acc)
    csq = cf.square().sum(dim=1)  # (K,)
    rows = max(1, _REF_CHUNK_ELEMS // cf.shape[0])
    idx = torch.cat([torch.addmm(csq, xc, cf.t(), alpha=-2).argmin(dim=1) for xc in xf.split(rows)])
    sqdist = (xf - cf.index_select(0, idx)).square().sum(dim=1)  # (N,)
    return idx, sqdist


def vector_quantize_ref(z: Tensor, codebook: Tensor, beta: float = 0.25) -> VQOutput:
    """Plain-torch VQ-VAE quantizer (the formula in the module docstring, with detach as sg)."""
    flat = z.reshape(-1, z.shape[-1])  # (N, D)
    with torch.no_grad():
        idx, _ = vq_nearest_ref(flat, codebook)
    z_q = codebook.index_select(0, idx)  # (N, D)
    acc = torch.promote_types(z.dtype, torch.float32)
    zf, zqf = flat.to(acc), z_q.to(acc)
    n = max(flat.numel(), 1)
    loss = (zqf - zf.detach()).square().sum() / n + beta * (zf - zqf.detach()).square().sum() / n
    z_st = z_q.detach() + (flat - flat.detach())  # value exactly z_q, gradient identity to z only
    return VQOutput(z_st.view(z.shape), idx.view(z.shape[:-1]), loss)


def _validate(op: str, name: str, x: Tensor, codebook: Tensor, impl: str, shape: str) -> None:
    """Argument checks shared by vq_nearest ((N, D) x) and vector_quantize ((..., D) z)."""
    check_tensors(op, {name: x, "codebook": codebook}, KERNEL_DTYPES + ((torch.float64,) if impl == "ref" else ()))
    if (shape == "(N, D)" and x.dim() != 2) or x.dim() < 1:
        raise ValueError(f"{op}: {name} must be {shape}, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if codebook.dim() != 2 or codebook.shape[1] != D:
        raise ValueError(
            f"{op}: codebook must be (K, D={D}) for {name} of shape {tuple(x.shape)}, got {tuple(codebook.shape)}"
        )
    if codebook.shape[0] == 0:
        raise ValueError(f"{op}: codebook is empty; expected (K >= 1, D={D})")
    # A sum is NaN/inf iff some element is, or finite values overflow fp32 (|c| ~ 1e19 already
    # overflows ||c||^2): one fused reduction. Only on CPU, where it costs no device sync; on CUDA the
    # kernel turns a non-finite codebook into NaN distances (and a NaN loss) instead of a host sync
    # per call. Skipped under torch.compile (it would break the graph).
    if (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not bool(torch.isfinite(codebook.sum(dtype=torch.float32)))
    ):
        raise ValueError(f"{op}: codebook (K={codebook.shape[0]}, D={D}) has non-finite (or overflowing) values")


def vq_nearest(x: Tensor, codebook: Tensor, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Nearest code of every row: (indices (N,) int64, squared distances (N,) float32; float64
    for float64 inputs, which only impl="ref" takes).

    x (N, D) and codebook (K, D) of one dtype, float32/bfloat16/float16 (float64 with impl="ref");
    dot products accumulate in fp32. Ties go to the lowest code index. The distance is recomputed
    from x - c_idx, so it is exact to fp32 rounding and never negative. Never builds the N x K
    matrix. sqdist is differentiable (2 (x - c_idx) to x, its negative to the chosen codes).
    A codebook with NaN/inf values raises ValueError on CPU; on CUDA (checked without a host sync)
    it makes every sqdist NaN.
    impl: "auto" (Triton on CUDA, C++ on CPU when built, else "ref"), "triton", "cpp" or "ref".
    """
    _validate("vq_nearest", "x", x, codebook, impl, "(N, D)")
    where = _route(impl, x.device, "vq_nearest", cpp=_CPP)
    if where == "ref" or x.shape[0] == 0:
        return vq_nearest_ref(x, codebook)
    sqdist, idx = (_nearest_interpreted if where == "interpret" else _vq_nearest_op)(x, codebook)
    return idx, sqdist


def vector_quantize(z: Tensor, codebook: Tensor, beta: float = 0.25, impl: str = "auto") -> VQOutput:
    """VQ-VAE quantization of z (..., D) with codebook (K, D) (same dtype; see vq_nearest).

    Returns VQOutput(z_q, indices, loss): z_q has z's shape and dtype and passes its gradient
    straight through to z; indices is int64 z.shape[:-1]; loss is the float32 scalar
        ||sg[z] - z_q||^2 + beta * ||z - sg[z_q]||^2    (each a mean over the z.numel() elements),
    the codebook term training the codebook and the commitment term (weight beta) the encoder
    (van den Oord et al. 2017, eq. 3). An empty z gives empty outputs and a zero loss. A non-finite
    codebook raises on CPU and gives a NaN loss on CUDA (see vq_nearest).
    """
    _validate("vector_quantize", "z", z, codebook, impl, "(..., D)")
    if not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"vector_quantize: beta must be a non-negative number, got {beta!r}")
    where = _route(impl, z.device, "vector_quantize", cpp=_CPP)
    if where == "ref" or z.numel() == 0:
        return vector_quantize_ref(z, codebook, beta)
    op = _vector_quantize_interpreted if where == "interpret" else _vector_quantize_op
    z_q, idx, loss = op(z.reshape(-1, z.shape[-1]), codebook, float(beta))
    return VQOutput(z_q.view(z.shape), idx.view(z.shape[:-1]), loss)
