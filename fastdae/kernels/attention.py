"""Fused attention (FlashAttention-2 style, Dao 2023): softmax(scale * Q K^T) V without the N x N matrix.

For one (batch, head), Q (N, D), K and V (M, D), S = scale * Q K^T, P = softmax(S) row-wise:

    forward    O = P V,  lse_i = log sum_j exp(S_ij)                     (online softmax over K/V tiles)
    backward   dV = P^T dO,  dP = dO V^T,  Delta_i = sum_d dO_id O_id,
               dS = P * (dP - Delta),  dQ = scale * dS K,  dK = scale * dS^T Q

Only O and lse (B, H, N) float32 (in base 2: lse / ln 2) are saved; backward recomputes
P = exp(S - lse) tile by tile. The backward is atomic-free: one kernel owns a K/V tile and streams
Q/dO tiles (dK, dV), another owns a Q tile and streams K/V tiles (dQ); Delta comes from a small
pre-pass. Exponentials are base 2 (exp(x) = exp2(x log2 e), with log2 e folded into the score scale).

Any sequence length: the loops run over full tiles without masks, then one masked tail tile.
Head dims: multiples of 8 up to 128. tl.arange and tl.dot need power-of-two extents >= 16, so the
head dim is held as two register chunks D = D0 + D1 (D0 the largest power of two <= D, at least 16;
D1 the next power of two >= the rest, at least 16, masked), e.g. 72 = 64 + 16 (8 live), 40 = 32 + 16,
8 = 16 (masked), 128 = 128. Every product over D is a sum of two tl.dot's. The tensors are never
padded in memory, and the register width D0 + D1 never exceeds padding to a power of two: for DiT-XL's
72 the kernels do 80 columns of work where padding would do 128 (FlashAttention-2's kernels: 96).

Inputs: any strides (e.g. q, k, v as views of one fused qkv projection); when every base is 16-byte
aligned and every row/head/batch stride a multiple of 16 bytes (checked at launch: align_elems), the
kernels say so with tl.multiple_of, which turns D = 72's 2-byte scalar loads into 128-bit cp.async
(the static kernel report, fastdae/kernel_report/). bf16/fp16 with fp32 accumulation on a GPU;
fp32 only under the interpreter (CPU tests, IEEE fp32 products): on a GPU its dots would run on CUDA
cores (IEEE) or spill (3xTF32, 1.1-3.0 KB per thread at the bf16 tiles), so impl="auto" sends fp32
to SDPA and impl="triton" refuses it with a ValueError naming SDPA. The output is a (B, H, N, D) view
of a (B, N, H, D) buffer, so merging heads afterwards (`o.transpose(1, 2).reshape`) is free.

Loads (static kernel report, sm_90, bf16, warp-instructions issued per 1,024 scores in the main
loop): on Hopper and newer, aligned inputs with a one-chunk head dim (64, 128) stream their tiles
through host-side TMA descriptors (4D over the (B, H, N, D) view, so fused-qkv views need no copy
and tails read as zeros), forward 216 / 240 at D = 64 / 128 against 234 / 274 with cp.async. The
cp.async pointer path stays for sm_80, unaligned or broadcast views and D = 72, where it wins
(274 vs 278). An earlier reading favoured cp.async over device-side
descriptors (995 vs 613 "main-loop" instructions); that was the report's loop reader taking the TMA
retry stubs after EXIT for the loop (fastdae/kernel_report/sass.py). The forward also takes the
row sums on the tensor cores (P @ ones) and folds the score scale into the exp2 FFMA.

File order: Triton kernels -> launch config -> launchers -> ops (reference and fake kernels, autograd) ->
attention_ref -> attention.

Length (~830 lines, over the package's ~400): one op is one file in the house order above
(kernels, configs, launchers, op, reference, public function), and the Triton kernels take 20-45
arguments each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from fastdae.kernels._common import (
    KERNEL_DTYPES,
    check_tensors,
    define_op_pair,
    dot,
    interpreted,
    on_device,
    precision,
)
from fastdae.kernels._dispatch import route, triton_interpret
from fastdae.kernels._launch import (
    ALIGN_BYTES,
    KernelLaunch,
    LaunchConfig,
    align_elems,
    arch_of,
    configs,
    launch,
    strides,
)

MAX_HEAD_DIM = 128
MAX_GRID_YZ = 65535  # CUDA limit of grid axes 1 and 2, which carry heads and batch
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
IMPLS_EXTRA = ("sdpa", "xformers")
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)  # what "ref" and "sdpa" take
# torch.compile evaluates the backend choice once at trace time
_route = torch.compiler.assume_constant_result(route)


# ---------------------------------------------------------------------------------------------
# Triton kernels. Program (tile, h, b); every (rows, D) matrix is read as chunks [0, D0), [D0, D0 + D1).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _program():
    """This program's ids on the launch grid (tile, head, batch): (tile, h32, b32, h, b), head and
    batch as int32 (TMA coordinates) and widened to int64 (offsets)."""
    tile, h32, b32 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    return tile, h32, b32, h32.to(tl.int64), b32.to(tl.int64)


@triton.jit
def _head(ptr, sb, sh, sn, b, h, ALIGN: tl.constexpr):
    """(base pointer, row stride) of one (batch, head) of a tensor with (batch, head, row) strides
    (sb, sh, sn), the strides asserted multiples of ALIGN elements (16 bytes) when the launcher
    checked them (align_elems); ALIGN = 1 claims nothing. With 16-byte aligned bases this is what
    lets D = 72 tiles load as 128-bit / cp.async rows instead of 2-byte scalars."""
    if ALIGN > 1:  # hints attach to an op's result, not to a kernel argument: widen first (offsets are int64)
        sb = tl.multiple_of(sb.to(tl.int64), ALIGN)
        sh = tl.multiple_of(sh.to(tl.int64), ALIGN)
        sn = tl.multiple_of(sn.to(tl.int64), ALIGN)
    return ptr + b * sb + h * sh, sn


@triton.jit
def _load_rows(base, rows, n_rows, row_stride, d_stride, D_START: tl.constexpr, D_BLOCK: tl.constexpr,
        HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr):  # fmt: skip
    """(len(rows), D_BLOCK) tile of columns D_START... of a (n_rows, HEAD_DIM) matrix; zeros outside it."""
    cols = D_START + tl.arange(0, D_BLOCK)
    ptrs = base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :] * d_stride
    if MASK_ROWS:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    elif D_START + D_BLOCK > HEAD_DIM:
        tile = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(
    base, tile, rows, n_rows, row_stride, d_stride, D_START: tl.constexpr, D_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr
):
    cols = D_START + tl.arange(0, D_BLOCK)
    ptrs = base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :] * d_stride
    mask = (rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _load_held(a_base, b_base, rows, n_rows, san, sad, sbn, sbd, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
        D1: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """The rows `rows` (BLOCK of them; past n_rows read as zeros) of the two (n_rows, HEAD_DIM)
    matrices A and B a backward program holds across its loop (dK/dV: K and V; dQ: Q and dO), as
    column chunks (a0, a1, b0, b1): (BLOCK, D0), (BLOCK, D1), ...; without SPLIT a1 and b1 are unused
    zero placeholders."""
    a0 = _load_rows(a_base, rows, n_rows, san, sad, 0, D0, HEAD_DIM, True)
    b0 = _load_rows(b_base, rows, n_rows, sbn, sbd, 0, D0, HEAD_DIM, True)
    if SPLIT:
        a1 = _load_rows(a_base, rows, n_rows, san, sad, D0, D1, HEAD_DIM, True)
        b1 = _load_rows(b_base, rows, n_rows, sbn, sbd, D0, D1, HEAD_DIM, True)
    else:
        a1 = tl.zeros((BLOCK, D1), dtype=a0.dtype)
        b1 = tl.zeros((BLOCK, D1), dtype=a0.dtype)
    return a0, a1, b0, b1


@triton.jit
def _load_vec(base, rows, n_rows, MASK_ROWS: tl.constexpr):
    if MASK_ROWS:
        vec = tl.load(base + rows, mask=rows < n_rows, other=0.0)
    else:
        vec = tl.load(base + rows)
    return vec


@triton.jit
def _load_tile(desc, b, h, start, base, n_rows, row_stride, d_stride, D_START: tl.constexpr,
        D_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, MASK_ROWS: tl.constexpr,
        USE_TMA: tl.constexpr):  # fmt: skip
    """Rows start ... start + BLOCK, columns D_START ... of one (batch, head): through the TMA
    descriptor `desc` (over the (B, H, N, D) view, block (1, 1, BLOCK, D_BLOCK); rows and columns
    outside the tensor read as zeros, so no masks) when USE_TMA, else pointer loads from `base`."""
    if USE_TMA:
        tile = desc.load([b, h, start, D_START]).reshape(BLOCK, D_BLOCK)
    else:
        tile = _load_rows(
            base, start + tl.arange(0, BLOCK), n_rows, row_stride, d_stride, D_START, D_BLOCK, HEAD_DIM, MASK_ROWS
        )
    return tile


@triton.jit
def _sweep(STEP: tl.constexpr, acc, held, x_base, y_base, xd0, xd1, yd0, yd1, b, h, n, sxn, sxd, syn, syd,
        qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """The main loop of the forward, dK/dV and dQ kernels: acc = STEP(acc, held, ...) over the
    BLOCK-row tiles of the two (n, D) matrices the kernel streams, X and Y (forward and dQ: K and V;
    dK/dV: Q and dO) of one (batch, head): their bases, TMA descriptors and (row, column) strides.
    `acc` is the loop-carried tuple, `held` what the program holds across the loop. The full tiles
    run the step compiled with MASK = False (no masks), then the partial tail tile, if any, the one
    compiled with MASK = True."""
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):
        # fmt: off
        acc = STEP(acc, held, x_base, y_base, xd0, xd1, yd0, yd1, b, h, start, n, sxn, sxd, syn, syd, qk_scale,
                   HEAD_DIM, D0, D1, SPLIT, BLOCK, False, PRECISION, USE_TMA)
        # fmt: on
    if n_full < n:
        # fmt: off
        acc = STEP(acc, held, x_base, y_base, xd0, xd1, yd0, yd1, b, h, n_full, n, sxn, sxd, syn, syd, qk_scale,
                   HEAD_DIM, D0, D1, SPLIT, BLOCK, True, PRECISION, USE_TMA)
        # fmt: on
    return acc


@triton.jit
def _fwd_step(acc, held, k_base, v_base, kd0, kd1, vd0, vd1, b, h, start_n, N_KV, skn, skd, svn, svd, qk_scale,
        HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
        MASK_N: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """One K/V tile of the online softmax (a _sweep step; held: Q's chunks): rescale the running
    (acc, m, l) to the new row max."""
    acc0, acc1, m_i, l_i = acc
    q0, q1 = held
    cols = start_n + tl.arange(0, BLOCK_N)
    k0 = _load_tile(kd0, b, h, start_n, k_base, N_KV, skn, skd, 0, D0, HEAD_DIM, BLOCK_N, MASK_N, USE_TMA)
    s = dot(q0, tl.trans(k0), None, PRECISION)  # (BLOCK_M, BLOCK_N)
    if SPLIT:
        k1 = _load_tile(kd1, b, h, start_n, k_base, N_KV, skn, skd, D0, D1, HEAD_DIM, BLOCK_N, MASK_N, USE_TMA)
        s = dot(q1, tl.trans(k1), s, PRECISION)
    if MASK_N:
        s = tl.where((cols < N_KV)[None, :], s, float("-inf"))
    # the scale is applied after the row max (qk_scale > 0, the launcher's contract), so scaling and
    # subtracting the max are one FFMA per score; m_new is finite: every tile has a live column
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    p = p.to(k0.dtype)
    # the row sums on the tensor cores: P @ ones(BLOCK_N, 16) (16 equal columns, the narrowest MMA),
    # instead of one FADD per score; they sum the same rounded P the output is made of
    l_i = dot(p, tl.full((BLOCK_N, 16), 1.0, p.dtype), l_i * alpha[:, None], PRECISION)
    v0 = _load_tile(vd0, b, h, start_n, v_base, N_KV, svn, svd, 0, D0, HEAD_DIM, BLOCK_N, MASK_N, USE_TMA)
    acc0 = dot(p, v0, acc0 * alpha[:, None], PRECISION)
    if SPLIT:
        v1 = _load_tile(vd1, b, h, start_n, v_base, N_KV, svn, svd, D0, D1, HEAD_DIM, BLOCK_N, MASK_N, USE_TMA)
        acc1 = dot(p, v1, acc1 * alpha[:, None], PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, kd0, kd1, vd0, vd1, o_ptr, lse_ptr, H, N_Q, N_KV,
        qk_scale, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
        HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
        USE_TMA: tl.constexpr):  # fmt: skip
    """O and the base-2 lse of BLOCK_M query rows of one (batch, head), streaming its K/V tiles;
    kd0, kd1, vd0, vd1: TMA descriptors of K's and V's column chunks (USE_TMA), else unused."""
    pid_m, h32, b32, h, b = _program()
    q_base, sqn = _head(q_ptr, sqb, sqh, sqn, b, h, ALIGN)
    k_base, skn = _head(k_ptr, skb, skh, skn, b, h, ALIGN)
    v_base, svn = _head(v_ptr, svb, svh, svn, b, h, ALIGN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0 = _load_rows(q_base, rows, N_Q, sqn, sqd, 0, D0, HEAD_DIM, True)  # (BLOCK_M, D0)
    if SPLIT:
        q1 = _load_rows(q_base, rows, N_Q, sqn, sqd, D0, D1, HEAD_DIM, True)  # (BLOCK_M, D1)
    else:
        q1 = tl.zeros((BLOCK_M, D1), dtype=q0.dtype)  # unused placeholder
    acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M, 16), dtype=tl.float32)  # the row sum, in each of 16 equal columns
    # fmt: off
    acc0, acc1, m_i, l_i = _sweep(_fwd_step, (acc0, acc1, m_i, l_i), (q0, q1), k_base, v_base, kd0, kd1, vd0, vd1, b32,
                                  h32, N_KV, skn, skd, svn, svd, qk_scale, HEAD_DIM, D0, D1, SPLIT, BLOCK_N, PRECISION,
                                  USE_TMA)
    # fmt: on
    o_base, son = _head(o_ptr, sob, soh, son, b, h, ALIGN)
    l_i = tl.max(l_i, 1)  # the 16 columns are equal
    inv_l = 1.0 / l_i
    _store_rows(o_base, acc0 * inv_l[:, None], rows, N_Q, son, sod, 0, D0, HEAD_DIM)
    if SPLIT:
        _store_rows(o_base, acc1 * inv_l[:, None], rows, N_Q, son, sod, D0, D1, HEAD_DIM)
    # base-2 lse, log2 sum_j 2^(S_ij log2 e) = lse / ln 2: backward subtracts it from scores in the same
    # units, so no conversion rounds it again (rounding at |lse| ~ 100 shifts every P_ij of the row)
    tl.store(lse_ptr + (b * H + h) * N_Q + rows, m_i + tl.math.log2(l_i), mask=rows < N_Q)


@triton.jit
def _attention_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, H, N_Q, sob, soh, son, sod, sdb, sdh, sdn,
        sdd, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ALIGN: tl.constexpr):  # fmt: skip
    """Delta_i = sum_d O_id dO_id (B, H, N) float32; BLOCK_D is a power of two >= HEAD_DIM (no dot here)."""
    pid_m, _, _, h, b = _program()
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_base, son = _head(o_ptr, sob, soh, son, b, h, ALIGN)
    o = _load_rows(o_base, rows, N_Q, son, sod, 0, BLOCK_D, HEAD_DIM, True)
    do_base, sdn = _head(do_ptr, sdb, sdh, sdn, b, h, ALIGN)
    do = _load_rows(do_base, rows, N_Q, sdn, sdd, 0, BLOCK_D, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + (b * H + h) * N_Q + rows, delta, mask=rows < N_Q)


@triton.jit
def _bwd_dkdv_step(acc, held, q_base, do_base, qd0, qd1, dod0, dod1, b, h, start_m, N_Q, sqn, sqd, sdn, sdd,
        qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """One Q/dO tile into the (BLOCK_N, D) accumulators of dK (unscaled) and dV, in transposed form
    (a _sweep step; held: K's and V's chunks, the lse and Delta rows of the (batch, head))."""
    dk0, dk1, dv0, dv1 = acc
    k0, k1, v0, v1, lse_base, delta_base = held
    rows = start_m + tl.arange(0, BLOCK_M)
    q0 = _load_tile(qd0, b, h, start_m, q_base, N_Q, sqn, sqd, 0, D0, HEAD_DIM, BLOCK_M, MASK_M, USE_TMA)
    do0 = _load_tile(dod0, b, h, start_m, do_base, N_Q, sdn, sdd, 0, D0, HEAD_DIM, BLOCK_M, MASK_M, USE_TMA)
    s_t = dot(k0, tl.trans(q0), None, PRECISION)  # (BLOCK_N, BLOCK_M) = S^T / scale
    if SPLIT:
        q1 = _load_tile(qd1, b, h, start_m, q_base, N_Q, sqn, sqd, D0, D1, HEAD_DIM, BLOCK_M, MASK_M, USE_TMA)
        do1 = _load_tile(dod1, b, h, start_m, do_base, N_Q, sdn, sdd, D0, D1, HEAD_DIM, BLOCK_M, MASK_M, USE_TMA)
        s_t = dot(k1, tl.trans(q1), s_t, PRECISION)
    lse2 = _load_vec(lse_base, rows, N_Q, MASK_M)
    p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])  # P^T
    if MASK_M:
        p_t = tl.where((rows < N_Q)[None, :], p_t, 0.0)
    dv0 = dot(p_t.to(q0.dtype), do0, dv0, PRECISION)
    dp_t = dot(v0, tl.trans(do0), None, PRECISION)  # (BLOCK_N, BLOCK_M) = dP^T
    if SPLIT:
        dv1 = dot(p_t.to(q0.dtype), do1, dv1, PRECISION)
        dp_t = dot(v1, tl.trans(do1), dp_t, PRECISION)
    delta = _load_vec(delta_base, rows, N_Q, MASK_M)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)  # dS^T
    dk0 = dot(ds_t, q0, dk0, PRECISION)
    if SPLIT:
        dk1 = dot(ds_t, q1, dk1, PRECISION)
    return dk0, dk1, dv0, dv1


@triton.jit
def _attention_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, qd0, qd1, dod0, dod1, lse_ptr, delta_ptr,
        dk_ptr, dv_ptr, H, N_Q, N_KV, qk_scale, scale, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh,
        svn, svd, sdb, sdh, sdn, sdd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
        HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
        USE_TMA: tl.constexpr):  # fmt: skip
    """dK and dV of BLOCK_N key rows of one (batch, head), streaming its Q/dO tiles; qd0, qd1, dod0,
    dod1: TMA descriptors of Q's and dO's column chunks (USE_TMA), else unused."""
    pid_n, h32, b32, h, b = _program()
    k_base, skn = _head(k_ptr, skb, skh, skn, b, h, ALIGN)
    v_base, svn = _head(v_ptr, svb, svh, svn, b, h, ALIGN)
    q_base, sqn = _head(q_ptr, sqb, sqh, sqn, b, h, ALIGN)
    do_base, sdn = _head(do_ptr, sdb, sdh, sdn, b, h, ALIGN)
    lse_base = lse_ptr + (b * H + h) * N_Q
    delta_base = delta_ptr + (b * H + h) * N_Q
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # K/V rows past N_KV load as 0; their dK/dV rows are never stored and no other row reads them
    k0, k1, v0, v1 = _load_held(k_base, v_base, cols, N_KV, skn, skd, svn, svd, HEAD_DIM, D0, D1, SPLIT, BLOCK_N)
    dk0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), dtype=tl.float32)
    dk1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
    dv1 = tl.zeros((BLOCK_N, D1), dtype=tl.float32)
    # fmt: off
    dk0, dk1, dv0, dv1 = _sweep(_bwd_dkdv_step, (dk0, dk1, dv0, dv1), (k0, k1, v0, v1, lse_base, delta_base),
                                q_base, do_base, qd0, qd1, dod0, dod1, b32, h32, N_Q, sqn, sqd, sdn, sdd, qk_scale,
                                HEAD_DIM, D0, D1, SPLIT, BLOCK_M, PRECISION, USE_TMA)
    # fmt: on
    dk_base, sdkn = _head(dk_ptr, sdkb, sdkh, sdkn, b, h, ALIGN)
    dv_base, sdvn = _head(dv_ptr, sdvb, sdvh, sdvn, b, h, ALIGN)
    _store_rows(dk_base, dk0 * scale, cols, N_KV, sdkn, sdkd, 0, D0, HEAD_DIM)
    _store_rows(dv_base, dv0, cols, N_KV, sdvn, sdvd, 0, D0, HEAD_DIM)
    if SPLIT:
        _store_rows(dk_base, dk1 * scale, cols, N_KV, sdkn, sdkd, D0, D1, HEAD_DIM)
        _store_rows(dv_base, dv1, cols, N_KV, sdvn, sdvd, D0, D1, HEAD_DIM)


@triton.jit
def _bwd_dq_step(acc, held, k_base, v_base, kd0, kd1, vd0, vd1, b, h, start_n, N_KV, skn, skd, svn, svd,
        qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """One K/V tile into the (BLOCK_M, D) accumulator of dQ (unscaled) (a _sweep step; held: Q's and
    dO's chunks, the rows' lse and Delta)."""
    dq0, dq1 = acc
    q0, q1, do0, do1, lse2, delta = held
    cols = start_n + tl.arange(0, BLOCK_N)
    k0 = _load_tile(kd0, b, h, start_n, k_base, N_KV, skn, skd, 0, D0, HEAD_DIM, BLOCK_N, MASK_N, USE_TMA)
    v0 = _load_tile(vd0, b, h, start_n, v_base, N_KV, svn, svd, 0, D0, HEAD_DIM, BLOCK_N, MASK_N, USE_TMA)
    s = dot(q0, tl.trans(k0), None, PRECISION)  # (BLOCK_M, BLOCK_N)
    dp = dot(do0, tl.trans(v0), None, PRECISION)
    if SPLIT:
        k1 = _load_tile(kd1, b, h, start_n, k_base, N_KV, skn, skd, D0, D1, HEAD_DIM, BLOCK_N, MASK_N, USE_TMA)
        v1 = _load_tile(vd1, b, h, start_n, v_base, N_KV, svn, svd, D0, D1, HEAD_DIM, BLOCK_N, MASK_N, USE_TMA)
        s = dot(q1, tl.trans(k1), s, PRECISION)
        dp = dot(do1, tl.trans(v1), dp, PRECISION)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASK_N:  # dead columns would add exp(-lse) * 0 terms, which overflow to NaN for very negative lse
        p = tl.where((cols < N_KV)[None, :], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(k0.dtype)  # (BLOCK_M, BLOCK_N)
    dq0 = dot(ds, k0, dq0, PRECISION)
    if SPLIT:
        dq1 = dot(ds, k1, dq1, PRECISION)
    return dq0, dq1


@triton.jit
def _attention_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, kd0, kd1, vd0, vd1, do_ptr, lse_ptr, delta_ptr,
        dq_ptr, H, N_Q, N_KV, qk_scale, scale, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn,
        svd, sdb, sdh, sdn, sdd, sdqb, sdqh, sdqn, sdqd, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
        D1: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, ALIGN: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """dQ of BLOCK_M query rows of one (batch, head), streaming its K/V tiles; kd0, kd1, vd0, vd1:
    TMA descriptors of K's and V's column chunks (USE_TMA), else unused."""
    pid_m, h32, b32, h, b = _program()
    q_base, sqn = _head(q_ptr, sqb, sqh, sqn, b, h, ALIGN)
    do_base, sdn = _head(do_ptr, sdb, sdh, sdn, b, h, ALIGN)
    k_base, skn = _head(k_ptr, skb, skh, skn, b, h, ALIGN)
    v_base, svn = _head(v_ptr, svb, svh, svn, b, h, ALIGN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1, do0, do1 = _load_held(q_base, do_base, rows, N_Q, sqn, sqd, sdn, sdd, HEAD_DIM, D0, D1, SPLIT, BLOCK_M)
    lse2 = _load_vec(lse_ptr + (b * H + h) * N_Q, rows, N_Q, True)
    delta = _load_vec(delta_ptr + (b * H + h) * N_Q, rows, N_Q, True)
    dq0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    dq1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    # fmt: off
    dq0, dq1 = _sweep(_bwd_dq_step, (dq0, dq1), (q0, q1, do0, do1, lse2, delta), k_base, v_base, kd0, kd1, vd0, vd1,
                      b32, h32, N_KV, skn, skd, svn, svd, qk_scale, HEAD_DIM, D0, D1, SPLIT, BLOCK_N, PRECISION,
                      USE_TMA)
    # fmt: on
    dq_base, sdqn = _head(dq_ptr, sdqb, sdqh, sdqn, b, h, ALIGN)
    _store_rows(dq_base, dq0 * scale, rows, N_Q, sdqn, sdqd, 0, D0, HEAD_DIM)
    if SPLIT:
        _store_rows(dq_base, dq1 * scale, rows, N_Q, sdqn, sdqd, D0, D1, HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# Launch configuration: the one place block sizes, warps and stages are chosen.
# ---------------------------------------------------------------------------------------------
def head_chunks(head_dim: int) -> tuple[int, int]:
    """(D0, D1) register chunks of the head dim: powers of two >= 16 with D0 <= D (unless D < 16) and
    D0 + D1 >= D; D1 = 0 when one chunk covers D. 72 -> (64, 16), 40 -> (32, 16), 8 -> (16, 0)."""
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU architecture, kernel and head-width family
# (D0 + D1 <= 64, <= 96 (DiT-XL's 72 -> 80), <= 128). fwd: a program owns BLOCK_M queries and streams
# K/V; dkdv: owns BLOCK_N keys (fp32 dK, dV accumulators in registers) and streams Q/dO; dq: owns
# BLOCK_M queries and streams K/V. Every entry compiles without spills for its architecture in the
# static kernel report (benchmarks/results/kernel-report-*), and each list starts with the model's
# best candidate there (the default: the interpreter's and the untuned launch); on CUDA the kernels
# autotune over the list once per (N_Q, N_KV, head dim, dtype). Hopper (sm_90, also used for newer
# GPUs until they get lists of their own) keeps wgmma operands in shared memory, so its wide tiles
# fit where sm_80's register-resident mma.sync operands spill.
_CONFIGS: dict[int, dict[tuple[str, int], list[tuple[int, int, int, int]]]] = {
    90: {
        ("fwd", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
        ("fwd", 96): [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
        ("fwd", 128): [(128, 128, 8, 2), (128, 64, 8, 3)],
        ("dkdv", 64): [(64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 4)],
        ("dkdv", 96): [(64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)],
        ("dkdv", 128): [(64, 64, 4, 2), (64, 128, 8, 1), (32, 128, 8, 2)],
        ("dq", 64): [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 2)],
        ("dq", 96): [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 2)],
        ("dq", 128): [(128, 64, 8, 2), (64, 64, 4, 2)],
    },
    80: {
        ("fwd", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
        ("fwd", 96): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
        ("fwd", 128): [(128, 64, 8, 3)],
        ("dkdv", 64): [(64, 128, 8, 3), (32, 64, 4, 4)],
        ("dkdv", 96): [(32, 64, 4, 3), (64, 64, 8, 2)],
        ("dkdv", 128): [(128, 32, 8, 3), (16, 128, 8, 3)],
        ("dq", 64): [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4)],
        ("dq", 96): [(64, 32, 4, 3), (64, 64, 8, 2)],
        ("dq", 128): [(32, 128, 8, 3), (128, 32, 8, 3)],
    },
}
_DELTA_BLOCK_M = 64
_DELTA_WARPS = 8  # 4 spill 76 B on sm_100 at D = 72 / 128 (two 64 x 128 fp32 tiles per 128 threads)
_TUNE_KEY = ("N_Q", "N_KV", "HEAD_DIM")


def launch_configs(kernel: str, head_dim: int, arch: int) -> tuple[LaunchConfig, ...]:
    """The candidate configs of one attention kernel ("fwd", "dkdv", "dq") for a head dim on a GPU
    architecture (10 * major + minor: sm_80 and sm_86/89 get the sm_80 lists, sm_90 and newer sm_90's)."""
    table = _CONFIGS[90 if arch >= 90 else 80]
    return configs([(dict(BLOCK_M=m, BLOCK_N=n), w, s) for m, n, w, s in table[(kernel, _family(head_dim))]])


# ---------------------------------------------------------------------------------------------
# Launchers: each launch is built by one function (shared with the static report), then run.
# ---------------------------------------------------------------------------------------------
def _constexprs(head_dim: int, dtype: torch.dtype) -> dict:
    d0, d1 = head_chunks(head_dim)
    return dict(
        HEAD_DIM=head_dim,
        D0=d0,
        D1=d1 or 16,
        SPLIT=d1 > 0,  # D1 = 16 sizes unused placeholders
        PRECISION=_precision(dtype),
    )


def _precision(dtype: torch.dtype) -> str:
    return precision(dtype, fp32="ieee")  # no TF32: fp32 inputs get fp32 products, like torch's default matmul


def _family(head_dim: int) -> int:
    """The register width bound D0 + D1 fits under: 64, 96 or 128."""
    width = sum(head_chunks(head_dim))
    return next(bound for bound in (64, 96, 128) if width <= bound)


def _descriptors(t: Tensor, head_dim: int, use_tma: bool) -> tuple:
    """TMA descriptors of t's two column chunks over its (B, H, N, D) view (block rows set per config
    by _set_block_rows), or t itself twice when the kernel takes pointers."""
    if not use_tma:
        return t, t
    d0, d1 = head_chunks(head_dim)
    # a size-1 dim is only ever indexed at 0: any 16-byte multiple is a valid stride for it
    st = [s if n > 1 else ALIGN_BYTES // t.element_size() for s, n in zip(t.stride()[:3], t.shape[:3], strict=True)]
    return tuple(TensorDescriptor(t, list(t.shape), [*st, 1], [1, 1, 16, d]) for d in (d0, d1 or 16))


def _set_block_rows(nargs: dict) -> None:
    """Autotuner pre-hook (and the plain launch's) of the forward and dQ: the K/V descriptors' block
    rows = the config's BLOCK_N."""
    _block_rows(nargs, ("kd0", "kd1", "vd0", "vd1"), nargs["BLOCK_N"])


def _set_block_rows_m(nargs: dict) -> None:
    """The same for dK/dV, whose streamed Q/dO tiles have BLOCK_M rows."""
    _block_rows(nargs, ("qd0", "qd1", "dod0", "dod1"), nargs["BLOCK_M"])


def _block_rows(nargs: dict, names: tuple[str, ...], rows: int) -> None:
    for name in names:
        desc = nargs[name]
        if isinstance(desc, TensorDescriptor):
            desc.block_shape = [1, 1, rows, desc.block_shape[3]]


def uses_tma(align: int, arch: int, head_dim: int, *streamed: Tensor) -> bool:
    """Streamed tiles through TMA: Hopper and newer, every stride and base 16-byte aligned (what TMA
    requires, and what align_elems checked; no stride-0 broadcast among the `streamed` tensors), and
    a head dim held in one register chunk. sm_80, unaligned or broadcast views and two-chunk head
    dims (72 = 64 + 16) take cp.async pointer loads: the static report puts the forward's loop at
    216 / 240 warp-instructions per 1,024 scores with TMA against 234 / 274 with cp.async at D = 64 /
    128 (sm_90, 128 x 128 w8), but 278 against 274 at D = 72, where the 16-wide chunk's descriptor
    loads cost more than its two cp.async.64 per thread. Backward (dK/dV + dQ per 1,024 scores):
    682 with TMA against 780 with cp.async at D = 128, 607 either way at D = 64."""
    broadcast = any(st == 0 for t in streamed for st, n in zip(t.stride(), t.shape, strict=True) if n > 1)
    return align > 1 and arch >= 90 and head_chunks(head_dim)[1] == 0 and not broadcast


# the kernels with a main loop (_sweep), by launch_configs' name: (kernel, the block of rows a program
# owns: BLOCK_M queries or BLOCK_N keys, the pre-hook that sizes its streamed tiles' TMA descriptors)
_LOOP_KERNELS: dict[str, tuple[Any, str, Callable[[dict], None]]] = {
    "fwd": (_attention_fwd_kernel, "BLOCK_M", _set_block_rows),
    "dkdv": (_attention_bwd_dkdv_kernel, "BLOCK_N", _set_block_rows_m),
    "dq": (_attention_bwd_dq_kernel, "BLOCK_M", _set_block_rows),
}


def _loop_launch(kernel: str, args: tuple, q: Tensor, owned_rows: int, align: int, use_tma: bool) -> KernelLaunch:
    """The launch of the forward, dK/dV or dQ kernel (`kernel`: "fwd", "dkdv", "dq") for queries like
    q, with programs (tile, head, batch) over the `owned_rows` rows (queries or keys) it owns."""
    fn, owned_block, set_block_rows = _LOOP_KERNELS[kernel]
    B, H, _, D = q.shape
    return KernelLaunch(
        fn,
        args,
        dict(_constexprs(D, q.dtype), ALIGN=align, USE_TMA=use_tma),
        launch_configs(kernel, D, arch_of(q)),
        lambda meta: (triton.cdiv(owned_rows, meta[owned_block]), H, B),
        _TUNE_KEY,
        set_block_rows if use_tma else None,
    )


def fwd_launch(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float) -> KernelLaunch:
    """The forward launch writing o (B, H, N, D) and lse (B, H, N) float32; scale > 0."""
    B, H, N, D = q.shape
    align = align_elems(q, k, v, o)
    use_tma = uses_tma(align, arch_of(q), D, k, v)
    descs = (*_descriptors(k, D, use_tma), *_descriptors(v, D, use_tma))
    sizes = (H, N, k.shape[2], scale * LOG2E)
    args = (q, k, v, *descs, o, lse, *sizes, *strides(q), *strides(k), *strides(v), *strides(o))
    return _loop_launch("fwd", args, q, N, align, use_tma)


def bwd_launches(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    delta: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    scale: float,
) -> list[KernelLaunch]:
    """The three backward launches, in order: Delta pre-pass, dK/dV, dQ."""
    B, H, N, D = q.shape
    M = k.shape[2]
    inputs = (*strides(q), *strides(k), *strides(v), *strides(grad))
    arch = arch_of(q)
    align_kv = align_elems(q, k, v, grad, dk, dv)
    tma_kv = uses_tma(align_kv, arch, D, q, grad)  # dK/dV streams Q and dO
    align_q = align_elems(q, k, v, grad, dq)
    tma_q = uses_tma(align_q, arch, D, k, v)  # dQ streams K and V
    # fmt: off
    dkdv_args = (q, k, v, grad, *_descriptors(q, D, tma_kv), *_descriptors(grad, D, tma_kv), lse, delta, dk, dv, H, N,
                 M, scale * LOG2E, scale, *inputs, *strides(dk), *strides(dv))
    dq_args = (q, k, v, *_descriptors(k, D, tma_q), *_descriptors(v, D, tma_q), grad, lse, delta, dq, H, N, M,
               scale * LOG2E, scale, *inputs, *strides(dq))
    # fmt: on
    return [
        KernelLaunch(
            _attention_bwd_delta_kernel,
            (o, grad, delta, H, N, *strides(o), *strides(grad)),
            dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), ALIGN=align_elems(o, grad)),
            configs([(dict(BLOCK_M=_DELTA_BLOCK_M), _DELTA_WARPS, 3)]),
            lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), H, B),
        ),
        _loop_launch("dkdv", dkdv_args, q, M, align_kv, tma_kv),
        _loop_launch("dq", dq_args, q, N, align_q, tma_q),
    ]


def _fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    B, H, N, D = q.shape
    if scale <= 0:  # the kernel takes a positive scale (it scales after the row max): fold the sign into q
        q, scale = (-q, -scale) if scale < 0 else (q * 0, 1.0)
    o = q.new_empty(B, N, H, D).transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D)
    lse = q.new_empty(B, H, N, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    with on_device(q):
        launch(fwd_launch(q, k, v, o, lse, scale))
    return o, lse


def _bwd_triton(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = torch.empty(q.shape, **_like(q)), torch.empty(k.shape, **_like(k)), torch.empty(v.shape, **_like(v))
    if q.numel() == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)  # (B, H, N) float32
    with on_device(q):
        for plan in bwd_launches(grad, q, k, v, o, lse, delta, dq, dk, dv, scale):
            launch(plan)
    return dq, dk, dv


def _like(t: Tensor) -> dict:
    return dict(dtype=t.dtype, device=t.device)


# ---------------------------------------------------------------------------------------------
# The ops (kernels/_common.py: define_op_pair): CUDA runs the Triton launchers above; every other device
# the reference kernels here (attention has no C++ kernel: on CPU impl="auto" takes torch's SDPA
# above the op). torch.compile sees one node per pass; autograd saves (q, k, v, o, lse).
# ---------------------------------------------------------------------------------------------
# q (B, H, N, D), k, v (B, H, M, D) -> (o (B, H, N, D), lse2 (B, H, N) float32): lse2 = logsumexp
# of the scaled scores / ln 2
_FWD_SCHEMA = "attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)"
# (grad_o, q, k, v, o, lse2, scale) -> (dq, dk, dv), each laid out contiguously
_BWD_SCHEMA = (
    "attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float scale)"
    " -> (Tensor, Tensor, Tensor)"
)


def _fwd_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The forward kernel's outputs in torch: o in the kernel's (B, N, H, D) buffer, lse in base 2."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale  # (B, H, N, M)
    lse = s.logsumexp(dim=-1)  # (B, H, N)
    o = _fwd_fake(q, k, v, scale)[0].copy_(torch.exp(s - lse[..., None]) @ v.to(acc))
    return o, (lse / math.log(2)).float()


def _bwd_reference(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The module docstring's backward in torch, from the saved o and base-2 lse."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, of, gf = (t.to(acc) for t in (q, k, v, o, grad))
    p = torch.exp2((qf @ kf.transpose(-2, -1)) * (scale * LOG2E) - lse.to(acc)[..., None])  # (B, H, N, M)
    ds = p * (gf @ vf.transpose(-2, -1) - (gf * of).sum(dim=-1, keepdim=True))  # P * (dP - Delta)
    dq, dk, dv = (ds @ kf) * scale, (ds.transpose(-2, -1) @ qf) * scale, p.transpose(-2, -1) @ gf
    dq, dk, dv = (torch.empty(t.shape, **_like(t)).copy_(g) for t, g in ((q, dq), (k, dk), (v, dv)))
    return dq, dk, dv


def _fwd_fake(q, k, v, scale):
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2), q.new_empty(B, H, N, dtype=torch.float32)


def _bwd_fake(grad, q, k, v, o, lse, scale):
    return torch.empty(q.shape, **_like(q)), torch.empty(k.shape, **_like(k)), torch.empty(v.shape, **_like(v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, grad_o: Tensor, grad_lse: Tensor | None):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(grad_o, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_attention_fwd_op, _attention_bwd_op = define_op_pair(
    (_FWD_SCHEMA, _fwd_triton, _fwd_reference, _fwd_fake),
    (_BWD_SCHEMA, _bwd_triton, _bwd_reference, _bwd_fake),
    autograd=_backward,
    setup_context=_setup_context,
)


# impl="triton" on CPU tensors under TRITON_INTERPRET=1 (tests only): the launchers, same formulas
def _interpreted_backward(ctx, grad_o: Tensor, grad_lse: Tensor | None):
    q, k, v, o, lse = ctx.saved_tensors
    return *_bwd_triton(grad_o, q, k, v, o, lse, ctx.scale), None


_attention_interpreted = interpreted(_fwd_triton, _setup_context, _interpreted_backward)


# ---------------------------------------------------------------------------------------------
# Reference, other backends and the public entry
# ---------------------------------------------------------------------------------------------
def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T) v in plain torch, in the inputs' dtype: the documentation and CPU path.

    Materialises the (B, H, N, M) score matrix: fine on a CPU at DiT-T sizes, not on a GPU at scale."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, M)
    return s.softmax(dim=-1) @ v  # (B, H, N, D)


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    try:
        import xformers.ops as xops
    except ImportError as err:
        raise ImportError("attention: impl='xformers' needs the xformers package, which is not installed") from err
    # xformers works in (B, N, H, D)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _validate(q: Tensor, k: Tensor, v: Tensor) -> None:
    check_tensors("attention", {"q": q, "k": k, "v": v}, FLOAT_DTYPES)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be (B, H, N, D), got shape {tuple(t.shape)}")
    B, H, N, D = q.shape
    if D == 0:
        raise ValueError(f"attention: head dim D must be >= 1, got q of shape {tuple(q.shape)}")
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D or k.shape[2] == 0:
        raise ValueError(
            f"attention: k and v must both be (B={B}, H={H}, M>=1, D={D}) for q {tuple(q.shape)}, "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )


def kernel_unsupported(q: Tensor) -> str | None:
    """Why the Triton kernel does not take q's dtype/shape on CUDA (route's `unsupported`), or None.

    fp32 is refused: with IEEE fp32 products its dots run on CUDA cores (25,000-instruction loops
    with tens of KB of spills per thread, ~100x slower than SDPA), and the 3xTF32 form of them
    spills 1.1-3.0 KB per thread at the bf16 tiles (static report, sm_90). SDPA's
    fp32 kernels are the fast fp32 path. The interpreter (CPU tests) still runs fp32: it checks
    the algorithm in a dtype whose reference is tight."""
    B, H, _, D = q.shape
    if q.dtype not in KERNEL_DTYPES:
        return f"impl='triton' takes {KERNEL_DTYPES}, got {q.dtype}; use impl='ref' or 'sdpa'"
    if q.dtype == torch.float32 and not interpreting(q):
        return "impl='triton' runs bf16/fp16 on a GPU; for fp32 use impl='sdpa' (or 'auto', which picks it)"
    if D % 8 or not 8 <= D <= MAX_HEAD_DIM:
        return (
            f"impl='triton' needs a head dim D that is a multiple of 8 in [8, {MAX_HEAD_DIM}], "
            f"got D={D}; use impl='sdpa' or 'ref'"
        )
    if B > MAX_GRID_YZ or H > MAX_GRID_YZ:
        return f"impl='triton' needs B, H <= {MAX_GRID_YZ}, got B={B}, H={H}"
    return None


def interpreting(q: Tensor) -> bool:
    """Whether a Triton launch for q runs under the interpreter (CPU tensors, tests only)."""
    return q.device.type != "cuda" and triton_interpret()


def auto_uses_kernel(q: Tensor) -> bool:
    """Whether impl="auto" runs the Triton kernel for CUDA inputs like q (bf16/fp16 at head dims and
    sizes it takes): what the static report marks as shipped."""
    return q.dtype in (torch.bfloat16, torch.float16) and kernel_unsupported(q) is None


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, impl: str = "auto") -> Tensor:
    """Non-causal softmax attention, like F.scaled_dot_product_attention without mask or dropout.

    q (B, H, N, D), k and v (B, H, M, D), any strides; returns (B, H, N, D) in q's dtype.
    scale: multiplies q k^T, default 1 / sqrt(D); NaN or inf raises ValueError.
    impl:
      "auto"     CUDA: the Triton kernel for bf16/fp16 with D a multiple of 8 up to 128; torch's SDPA
                 for fp32 (the kernel's IEEE-fp32 dots run on CUDA cores and spill registers: SDPA is
                 the faster fp32 path) and for head dims or batch sizes the kernel does not take.
                 CPU: torch's SDPA (measured 1.1-2.7x faster than the reference with 5-15x less
                 memory in benchmarks/results/cpu-*), with rows of q holding NaN/inf returned as NaN
                 like the reference (SDPA's CPU kernel returns zeros there).
      "triton"   the kernel: bf16/fp16, D a multiple of 8 up to 128; fp32 raises ValueError naming
                 SDPA on a GPU (its CUDA-core or 3xTF32 dots spill: no 100x-slow kernel is
                 reachable), and runs only under the interpreter (CPU tests);
      "ref", "sdpa" (torch's fused backends) or "xformers" (when installed).
    """
    _validate(q, k, v)
    if impl == "triton" and q.dtype not in KERNEL_DTYPES:  # a dtype error is a TypeError, like check_tensors'
        raise TypeError(f"attention: {kernel_unsupported(q)}")
    where = _route(impl, q.device, "attention", extra=IMPLS_EXTRA, fallback="sdpa", unsupported=kernel_unsupported(q))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):  # SDPA's CPU kernel returned zeros here, the reference NaN: neither is an answer
        raise ValueError(f"attention: scale must be a finite number, got {scale}")
    if where == "ref":
        return attention_ref(q, k, v, scale)
    if where == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        if impl == "auto" and q.device.type == "cpu":  # the reference's NaN rows (one O(B H N D) pass)
            out = torch.where(q.isfinite().all(dim=-1, keepdim=True), out, float("nan"))
        return out
    if where == "xformers":
        return _xformers_attention(q, k, v, scale)
    op = _attention_fwd_op if where == "op" else _attention_interpreted
    return op(q, k, v, scale)[0]
