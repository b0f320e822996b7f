"""The LPIPS head (Zhang et al., CVPR 2018): the part of LPIPS after the VGG trunk, fused.

For layers l with features f0_l, f1_l (B, C_l, H_l, W_l) and non-negative weights w_l (C_l,):

    u = f / (||f||_2 + eps)                        norm over channels, per image and position
    d[b] = sum_l 1/(H_l W_l) sum_{h,w} sum_c w_lc (u0 - u1)_c^2          -> (B,) float32

Backward, with a_c = 2 g_b / (H W) * w_c (u0 - u1)_c = dL/du0 = -dL/du1 and r = 1 / (n + eps):

    dL/df = r a - r^2 / n * (a . f) f

The second term tends to 0 as f -> 0 (|f_c f_k| / n <= n), so at f = 0 the gradient is r a, finite;
the public lpips package takes sqrt of the squared norm and gets 0 * inf = NaN there.

The fused kernels read each feature map once per pass: one program holds all C channels of a tile
of positions, so the norms, the weighted channel sum and (backward) a . f are computed from
registers; backward recomputes the norms instead of saving normalised copies. Per-tile sums are
written to a (B, tiles) buffer and summed in a fixed order, so results are deterministic.

File order: Triton kernels -> launchers -> ops (reference and fake kernels, autograd) -> lpips_head_ref -> lpips_head.

Length (~400 lines, the package's bound): one op is one file in the house order above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdae.kernels._common import KERNEL_DTYPES, check_tensors, define_op_pair, interpreted, on_device
from fastdae.kernels._dispatch import route
from fastdae.kernels._launch import KernelLaunch, configs, launch, num_warps_for

EPS = 1e-10  # added to the channel norm, as in the lpips package
_CPP = "lpips"  # csrc/lpips.cpp: the CPU kernels of both ops
_TILE_ELEMS = 4096  # channels x positions held by one program (per input map)
# torch.compile evaluates the backend choice once at trace time instead of tracing the C++ loader
_route = torch.compiler.assume_constant_result(route)


# ---------------------------------------------------------------------------------------------
# Triton kernels: program (tile, b) owns positions tile*BLOCK_P ... of image b, all channels.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile_offsets(b, c, p, sb, sc, sp):
    """int64 element offsets (BLOCK_C, BLOCK_P) of channels c at flat positions p = h * W + w.

    sp is the stride of p (the maps' H, W strides flatten; see _position_stride): a stride of 1
    (contiguous: sp, channels_last: sc) is specialised by Triton, which then vectorises that axis."""
    return b.to(tl.int64) * sb + c.to(tl.int64)[:, None] * sc + p.to(tl.int64)[None, :] * sp


@triton.jit
def _load_normalised(f0_ptr, f1_ptr, off0, off1, mask, EPS: tl.constexpr):
    """fp32 tiles x0, x1 (BLOCK_C, BLOCK_P), their channel norms n and r = 1 / (n + eps) (BLOCK_P,)."""
    x0 = tl.load(f0_ptr + off0, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(f1_ptr + off1, mask=mask, other=0.0).to(tl.float32)
    n0 = tl.sqrt(tl.sum(x0 * x0, axis=0))
    n1 = tl.sqrt(tl.sum(x1 * x1, axis=0))
    return x0, x1, n0, n1, 1.0 / (n0 + EPS), 1.0 / (n1 + EPS)


@triton.jit
def _load_tile(f0_ptr, f1_ptr, w_ptr, C, HW, s0b, s0c, s0p, s1b, s1c, s1p, EPS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
    """This program's tile of both maps (program (tile, b): positions tile*BLOCK_P ... of image b, all
    channels c): the mask of live (channel, position) lanes, the normalised fp32 tiles of
    _load_normalised and the channel weights w (BLOCK_C,), 0 past C."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (c < C)[:, None] & (p < HW)[None, :]
    off0 = _tile_offsets(b, c, p, s0b, s0c, s0p)
    off1 = _tile_offsets(b, c, p, s1b, s1c, s1p)
    x0, x1, n0, n1, r0, r1 = _load_normalised(f0_ptr, f1_ptr, off0, off1, mask, EPS)
    w = tl.load(w_ptr + c, mask=c < C, other=0.0)
    return tile, b, c, p, mask, x0, x1, n0, n1, r0, r1, w


@triton.jit
def _lpips_head_fwd_kernel(f0_ptr, f1_ptr, w_ptr, part_ptr, C, HW, part_stride_b, inv_hw, s0b, s0c, s0p,
        s1b, s1c, s1p, EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
    tile, b, c, p, mask, x0, x1, n0, n1, r0, r1, w = _load_tile(
        f0_ptr, f1_ptr, w_ptr, C, HW, s0b, s0c, s0p, s1b, s1c, s1p, EPS, BLOCK_C, BLOCK_P
    )
    d = x0 * r0[None, :] - x1 * r1[None, :]  # masked lanes: x = 0 -> d = 0
    tile_sum = tl.sum(tl.sum(w[:, None] * d * d, axis=0), axis=0)
    tl.store(part_ptr + b.to(tl.int64) * part_stride_b + tile, tile_sum * inv_hw)


@triton.jit
def _lpips_head_bwd_kernel(f0_ptr, f1_ptr, w_ptr, grad_ptr, g0_ptr, g1_ptr, C, HW, inv_hw, s0b, s0c,
        s0p, s1b, s1c, s1p, t0b, t0c, t0p, t1b, t1c, t1p, EPS: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr, NEED0: tl.constexpr, NEED1: tl.constexpr):  # fmt: skip
    tile, b, c, p, mask, x0, x1, n0, n1, r0, r1, w = _load_tile(
        f0_ptr, f1_ptr, w_ptr, C, HW, s0b, s0c, s0p, s1b, s1c, s1p, EPS, BLOCK_C, BLOCK_P
    )
    coef = 2.0 * tl.load(grad_ptr + b) * inv_hw
    a = (coef * w)[:, None] * (x0 * r0[None, :] - x1 * r1[None, :])  # dL/du0 (BLOCK_C, BLOCK_P)
    if NEED0:
        # k0 = r0^2 / n0 * (a . f0), and 0 where n0 == 0 (there f0 == 0, the limit of the term)
        inv_n0 = tl.where(n0 > 0, 1.0 / tl.maximum(n0, 1e-30), 0.0)
        k0 = r0 * r0 * inv_n0 * tl.sum(a * x0, axis=0)
        g0 = a * r0[None, :] - k0[None, :] * x0
        tl.store(g0_ptr + _tile_offsets(b, c, p, t0b, t0c, t0p), g0.to(g0_ptr.dtype.element_ty), mask=mask)
    if NEED1:
        inv_n1 = tl.where(n1 > 0, 1.0 / tl.maximum(n1, 1e-30), 0.0)
        k1 = -r1 * r1 * inv_n1 * tl.sum(a * x1, axis=0)
        g1 = -a * r1[None, :] - k1[None, :] * x1
        tl.store(g1_ptr + _tile_offsets(b, c, p, t1b, t1c, t1p), g1.to(g1_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _launch_config(C: int, HW: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps): all channels in one program, positions to fill _TILE_ELEMS."""
    block_c = triton.next_power_of_2(C)
    block_p = min(triton.next_power_of_2(HW), max(1, _TILE_ELEMS // block_c))
    return block_c, block_p, num_warps_for(block_c * block_p)


def _position_stride(t: Tensor) -> int | None:
    """Stride of the flat position p = h * W + w of a (B, C, H, W) tensor, or None when H, W do not
    flatten (true of contiguous and channels_last maps; a sliced map may need a copy)."""
    _, _, H, W = t.shape
    if W == 1:
        return t.stride(2)
    return t.stride(3) if H == 1 or t.stride(2) == W * t.stride(3) else None


def _flat(t: Tensor) -> Tensor:
    """t, or a contiguous copy when its H, W do not flatten into one position axis."""
    return t.contiguous() if _position_stride(t) is None else t


def fwd_launch(f0: Tensor, f1: Tensor, w: Tensor, part: Tensor) -> KernelLaunch:
    """One layer's forward launch: f0, f1 (B, C, H, W) with flat positions (see _flat_strides), w (C,)
    fp32 -> per-tile sums into part (B, >= tiles) fp32."""
    B, C, H, W = f0.shape
    block_c, block_p, warps = _launch_config(C, H * W)
    return KernelLaunch(
        _lpips_head_fwd_kernel,
        (f0, f1, w, part, C, H * W, part.stride(0), 1.0 / (H * W), *_flat_stride_args(f0), *_flat_stride_args(f1)),
        dict(EPS=EPS),
        configs([(dict(BLOCK_C=block_c, BLOCK_P=block_p), warps, 3)]),
        lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]), B),
    )


def bwd_launch(
    grad: Tensor, f0: Tensor, f1: Tensor, w: Tensor, g0: Tensor, g1: Tensor, need0: bool, need1: bool
) -> KernelLaunch:
    """One layer's backward launch: gradients into g0, g1 (flat positions; an unneeded one aliases f)."""
    B, C, H, W = f0.shape
    block_c, block_p, warps = _launch_config(C, H * W)
    return KernelLaunch(
        _lpips_head_bwd_kernel,
        (
            f0,
            f1,
            w,
            grad,
            g0,
            g1,
            C,
            H * W,
            1.0 / (H * W),
            *_flat_stride_args(f0),
            *_flat_stride_args(f1),
            *_flat_stride_args(g0),
            *_flat_stride_args(g1),
        ),
        dict(EPS=EPS, NEED0=need0, NEED1=need1),
        configs([(dict(BLOCK_C=block_c, BLOCK_P=block_p), warps, 3)]),
        lambda meta: (triton.cdiv(H * W, meta["BLOCK_P"]), B),
    )


def _flat_stride_args(t: Tensor) -> tuple[int, int, int]:
    """Strides of a map `_flat` made flattenable (so its position stride is never None)."""
    p = _position_stride(t)
    assert p is not None, "pass _flat(t)"
    return t.stride(0), t.stride(1), p


def _fwd_triton(feats0: list[Tensor], feats1: list[Tensor], weights: list[Tensor]) -> Tensor:
    B = feats0[0].shape[0]
    tiles = [
        triton.cdiv(f.shape[2] * f.shape[3], _launch_config(f.shape[1], f.shape[2] * f.shape[3])[1]) for f in feats0
    ]
    part = torch.empty(B, sum(tiles), device=feats0[0].device, dtype=torch.float32)  # (B, tiles of all layers)
    col = 0
    with on_device(feats0[0]):
        for f0, f1, w, n in zip(feats0, feats1, weights, tiles, strict=True):
            launch(fwd_launch(_flat(f0), _flat(f1), w, part[:, col:]))
            col += n
    return part.sum(dim=1)


def _bwd_triton(
    grad: Tensor, feats0: list[Tensor], feats1: list[Tensor], weights: list[Tensor], need0: bool, need1: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """Gradients come back laid out as torch.empty_like(feature) (what the fake promises)."""
    grad = grad.to(torch.float32).contiguous()
    grads0: list[Tensor] = []
    grads1: list[Tensor] = []
    for f0, f1, w in zip(feats0, feats1, weights, strict=True):
        out0 = torch.empty_like(f0) if need0 else None
        out1 = torch.empty_like(f1) if need1 else None
        f0, f1 = _flat(f0), _flat(f1)
        # outputs in odd strides are computed in a contiguous buffer and copied; unneeded ones alias f
        g0 = f0 if out0 is None else _flat(out0)
        g1 = f1 if out1 is None else _flat(out1)
        with on_device(f0):
            launch(bwd_launch(grad, f0, f1, w, g0, g1, need0, need1))
        if out0 is not None:
            grads0.append(g0 if g0 is out0 else out0.copy_(g0))
        if out1 is not None:
            grads1.append(g1 if g1 is out1 else out1.copy_(g1))
    return grads0, grads1


# ---------------------------------------------------------------------------------------------
# The ops (kernels/_common.py: define_op_pair): CUDA runs the Triton launchers above, CPU the C++ kernels
# of csrc/lpips.cpp, any other device (and the CPU without the C++ extension) the reference kernels
# here. torch.compile sees one node per pass; backward recomputes the norms from the saved features.
# ---------------------------------------------------------------------------------------------
# feats0, feats1 per layer (B, C, H, W), weights per layer (C,) float32 -> (B,) float32
_FWD_SCHEMA = "lpips_head(Tensor[] feats0, Tensor[] feats1, Tensor[] weights) -> Tensor"
# grad (B,) -> (per-layer gradients of feats0 if need0 else [], of feats1 if need1 else [])
_BWD_SCHEMA = (
    "lpips_head_backward(Tensor grad, Tensor[] feats0, Tensor[] feats1, Tensor[] weights, bool need0, bool need1)"
    " -> (Tensor[], Tensor[])"
)


def _fwd_reference(feats0: list[Tensor], feats1: list[Tensor], weights: list[Tensor]) -> Tensor:
    return lpips_head_ref(feats0, feats1, weights)


def _bwd_reference(
    grad: Tensor, feats0: list[Tensor], feats1: list[Tensor], weights: list[Tensor], need0: bool, need1: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """The module docstring's backward in torch, per layer: dL/df = r a - r^2 / n (a . f) f."""
    grads0: list[Tensor] = []
    grads1: list[Tensor] = []
    for f0, f1, w in zip(feats0, feats1, weights, strict=True):
        B, C, H, W = f0.shape
        acc = torch.promote_types(f0.dtype, torch.float32)
        x0, x1 = f0.to(acc), f1.to(acc)
        n0, n1 = (torch.linalg.vector_norm(x, dim=1, keepdim=True) for x in (x0, x1))  # (B, 1, H, W)
        r0, r1 = 1.0 / (n0 + EPS), 1.0 / (n1 + EPS)
        a = (2.0 / (H * W)) * grad.to(acc).view(B, 1, 1, 1) * w.to(acc).view(1, C, 1, 1) * (x0 * r0 - x1 * r1)
        sides = ((need0, grads0, f0, x0, n0, r0, 1.0), (need1, grads1, f1, x1, n1, r1, -1.0))
        for need, grads, f, x, n, r, sign in sides:
            if need:  # the second term's limit at n = 0 (where f = 0) is 0
                k = torch.where(n > 0, r * r / n.clamp_min(1e-30), 0.0) * (a * x).sum(dim=1, keepdim=True)
                grads.append(torch.empty_like(f).copy_(sign * (a * r - k * x)))  # laid out like the fake
    return grads0, grads1


def _fwd_fake(feats0, feats1, weights):
    acc = torch.promote_types(feats0[0].dtype, torch.float32)
    return feats0[0].new_empty(feats0[0].shape[0], dtype=acc)


def _bwd_fake(grad, feats0, feats1, weights, need0, need1):
    return (
        [torch.empty_like(f) for f in feats0] if need0 else [],
        [torch.empty_like(f) for f in feats1] if need1 else [],
    )


def _setup_context(ctx, inputs, output) -> None:
    feats0, feats1, weights = inputs
    ctx.n_layers = len(feats0)
    ctx.save_for_backward(*feats0, *feats1, *weights)


def _layers(tensors, L: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(feats0, feats1, weights) from the 3 L tensors feats0 + feats1 + weights."""
    return list(tensors[:L]), list(tensors[L : 2 * L]), list(tensors[2 * L :])


def _backward(ctx, grad: Tensor):
    L = ctx.n_layers
    need0, need1 = any(ctx.needs_input_grad[0]), any(ctx.needs_input_grad[1])
    grads0, grads1 = _lpips_head_backward_op(grad, *_layers(ctx.saved_tensors, L), need0, need1)
    none = [None] * L
    return grads0 or none, grads1 or none, none


_lpips_head_op, _lpips_head_backward_op = define_op_pair(
    (_FWD_SCHEMA, _fwd_triton, _fwd_reference, _fwd_fake),
    (_BWD_SCHEMA, _bwd_triton, _bwd_reference, _bwd_fake),
    autograd=_backward,
    setup_context=_setup_context,
)


# impl="triton" on CPU tensors under TRITON_INTERPRET=1 (tests only): the launchers with the same
# formulas; the layers arrive flattened, as autograd.Function differentiates tensor arguments only.
def _interpreted_forward(L: int, *tensors: Tensor) -> Tensor:
    return _fwd_triton(*_layers(tensors, L))


def _interpreted_setup_context(ctx, inputs, output) -> None:
    ctx.n_layers = inputs[0]
    ctx.save_for_backward(*inputs[1:])


def _interpreted_backward(ctx, grad: Tensor):
    L = ctx.n_layers
    need0, need1 = any(ctx.needs_input_grad[1 : 1 + L]), any(ctx.needs_input_grad[1 + L : 1 + 2 * L])
    grads0, grads1 = _bwd_triton(grad, *_layers(ctx.saved_tensors, L), need0, need1)
    none = [None] * L
    return None, *(grads0 or none), *(grads1 or none), *none


_lpips_head_interpreted = interpreted(_interpreted_forward, _interpreted_setup_context, _interpreted_backward)


# ---------------------------------------------------------------------------------------------
# Reference and public entry
# ---------------------------------------------------------------------------------------------
def lpips_head_ref(feats0: Sequence[Tensor], feats1: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """Plain-torch LPIPS head in the features' dtype: the documentation and the CPU fallback.

    Returns (B,) float32 (float64 for float64 features). torch's norm has subgradient 0 at 0, so
    its gradients at zero features equal the kernels' (finite) ones."""
    out: Tensor | None = None
    for f0, f1, w in zip(feats0, feats1, weights, strict=True):
        u0 = f0 / (torch.linalg.vector_norm(f0, dim=1, keepdim=True) + EPS)  # (B, C, H, W)
        u1 = f1 / (torch.linalg.vector_norm(f1, dim=1, keepdim=True) + EPS)
        dist = (w.to(f0.dtype).view(1, -1, 1, 1) * (u0 - u1).square()).sum(dim=1).mean(dim=(1, 2))  # (B,)
        out = dist if out is None else out + dist
    if out is None:
        raise ValueError("lpips_head_ref needs at least one layer")
    return out.to(torch.promote_types(out.dtype, torch.float32))


def _validate(feats0: Sequence[Tensor], feats1: Sequence[Tensor], weights: Sequence[Tensor], impl: str) -> None:
    for name, seq in (("feats0", feats0), ("feats1", feats1), ("weights", weights)):
        if not isinstance(seq, (list, tuple)) or not all(isinstance(t, Tensor) for t in seq):
            raise TypeError(f"lpips_head: {name} must be a list of tensors, got {type(seq).__name__}")
    if not feats0 or not (len(feats0) == len(feats1) == len(weights)):
        raise ValueError(
            f"lpips_head: feats0, feats1, weights must be non-empty lists of one length, "
            f"got {len(feats0)}, {len(feats1)}, {len(weights)}"
        )
    device = feats0[0].device
    B = feats0[0].shape[0] if feats0[0].dim() == 4 else "B"
    allowed = KERNEL_DTYPES + ((torch.float64,) if impl == "ref" else ())
    for i, (f0, f1, w) in enumerate(zip(feats0, feats1, weights, strict=True)):
        if f0.dim() != 4 or f0.shape != f1.shape or f0.shape[0] != B:
            raise ValueError(
                f"lpips_head: feats0[{i}] and feats1[{i}] must both be (B={B}, C, H, W), "
                f"got {tuple(f0.shape)} and {tuple(f1.shape)}"
            )
        if f0.shape[1] == 0 or f0.shape[2] * f0.shape[3] == 0:  # no channels to normalise / no positions to average
            raise ValueError(
                f"lpips_head: feats0[{i}] must have C >= 1 channels and H * W >= 1 positions, got {tuple(f0.shape)}"
            )
        check_tensors("lpips_head", {f"feats0[{i}]": f0, f"feats1[{i}]": f1}, allowed)
        if w.shape != (f0.shape[1],) or not w.is_floating_point():
            raise ValueError(
                f"lpips_head: weights[{i}] must be a float ({f0.shape[1]},) tensor, got {w.dtype} {tuple(w.shape)}"
            )
        if not (f0.device == w.device == device):
            raise ValueError(f"lpips_head: layer {i} tensors are on {f0.device} and {w.device}; expected {device}")


def lpips_head(
    feats0: Sequence[Tensor], feats1: Sequence[Tensor], weights: Sequence[Tensor], impl: str = "auto"
) -> Tensor:
    """LPIPS distance (B,) float32 from per-layer VGG features and lin weights.

    feats0, feats1: per layer (B, C_l, H_l, W_l) float32/bfloat16/float16, contiguous or channels_last
    (any strides work); weights: per layer (C_l,). Differentiable w.r.t. both feature lists; the
    weights are constants for impl "triton"/"cpp" (use impl="ref" to learn them).
    At an all-zero feature vector the exact gradient is a / eps (see the module docstring): finite in
    float32/bfloat16, beyond float16's range (inf); the trunk's ReLU backward zeroes it there.
    impl: "auto" (Triton on CUDA, C++ on CPU when built, else "ref"), "triton", "cpp" or "ref".
    """
    _validate(feats0, feats1, weights, impl)
    where = _route(impl, feats0[0].device, "lpips_head", cpp=_CPP)
    if where == "ref":
        return lpips_head_ref(feats0, feats1, weights)
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        raise ValueError("lpips_head: weights must not require grad with impl='triton'/'cpp'; use impl='ref'")
    weights = [w.detach().to(torch.float32).contiguous() for w in weights]
    if where == "interpret":
        return _lpips_head_interpreted(len(weights), *feats0, *feats1, *weights)
    return _lpips_head_op(list(feats0), list(feats1), weights)
