"""Fused attention: the Triton kernel (interpreted on CPU) against a float64 reference for the output
and dq, dk, dv; the custom ops under opcheck; argument errors; the nn.Attention module."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from fastdae.kernels.attention import (
    _attention_bwd_op,
    _attention_fwd_op,
    _bwd_triton,
    _fwd_triton,
    attention,
    attention_ref,
    head_chunks,
)
from fastdae.nn.attention import Attention
from tests.utils import assert_close_to_ref, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

# (B, H, N, M, D, dtype): N queries, M keys. N in {1, 97, 200} (tails of every tile size), D in
# {8, 40, 72, 128} (one masked chunk, 32 + 16, 64 + 16, one full chunk). fp32 covers every D; the
# 16-bit rows are fewer because the interpreter emulates them slowly.
CASES = [
    (2, 2, 1, 1, 8, torch.float32),
    (2, 1, 97, 97, 40, torch.float32),
    (1, 2, 200, 200, 72, torch.float32),
    (1, 2, 97, 97, 128, torch.float32),
    (1, 2, 97, 40, 72, torch.float32),  # cross-attention lengths
    (1, 2, 97, 97, 72, torch.bfloat16),
    (2, 1, 200, 200, 8, torch.bfloat16),
    (2, 2, 1, 1, 128, torch.bfloat16),
    (1, 2, 97, 97, 40, torch.float16),
    (2, 1, 97, 97, 128, torch.float16),
]


def _ids(case) -> str:
    B, H, N, M, D, dtype = case
    return f"B{B}H{H}-N{N}-M{M}-D{D}-{str(dtype).removeprefix('torch.')}"


def _qkv(B, H, N, M, D, dtype, device, requires_grad=True):
    q = torch.randn(B, H, N, D, device=device, dtype=dtype)
    k = torch.randn(B, H, M, D, device=device, dtype=dtype)
    v = torch.randn(B, H, M, D, device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _needs_fp32_kernel(device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """impl="triton" runs fp32 only under the interpreter: on a GPU it refuses it (see
    test_fp32_triton_is_refused_gpu), so the fp32 kernel checks run on CPU."""
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("impl='triton' refuses fp32 on a GPU")


def _fwd_bwd(fn, q, k, v, grad, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_attention_matches_reference(case, device):
    B, H, N, M, D, dtype = case
    _needs_fp32_kernel(device, dtype)
    q, k, v = _qkv(B, H, N, M, D, dtype, device)
    grad = torch.randn(B, H, N, D, device=device, dtype=dtype)
    scale = 0.3 if D == 40 else None  # one explicit scale
    kernel = _fwd_bwd(attention, q, k, v, grad, scale=scale, impl="triton")
    plain = _fwd_bwd(attention_ref, q, k, v, grad, scale=scale)
    ref64 = _fwd_bwd(attention_ref, q.double(), k.double(), v.double(), grad.double(), scale=scale)
    for name, out, torch_out, ref in zip(("out", "dq", "dk", "dv"), kernel, plain, ref64, strict=True):
        assert out.shape == ref.shape and out.dtype == dtype, name
        assert_close_to_ref(out, ref, torch_out, f"{_ids(case)} {name}")


# the interpreter warns about the dead K rows of the dK/dV kernel's tail tile (inf/NaN there by design:
# those rows are never stored); numpy reports it, a GPU does not
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_very_negative_scores_stay_finite(device):
    """All scores near -100 (lse < -88: exp(-lse) overflows fp32): dead tail columns must not turn
    exp(-lse) * 0 into NaN."""
    _needs_fp32_kernel(device)
    B, H, N, D = 1, 2, 97, 8
    q = torch.full((B, H, N, D), 6.0, device=device) + 0.1 * torch.randn(B, H, N, D, device=device)
    k = torch.full((B, H, N, D), -6.0, device=device) + 0.1 * torch.randn(B, H, N, D, device=device)
    v = torch.randn(B, H, N, D, device=device)
    grad = torch.randn(B, H, N, D, device=device)
    kernel = _fwd_bwd(attention, q, k, v, grad, impl="triton")
    ref64 = _fwd_bwd(attention_ref, q.double(), k.double(), v.double(), grad.double())
    # Not the 2x rule: one rounding of lse2 (~1e-5 at |lse2| ~ 150) rescales a whole row of the
    # recomputed P, and K's common component (-6) amplifies that in dq (as in FlashAttention-2).
    for name, out, ref in zip(("out", "dq", "dk", "dv"), kernel, ref64, strict=True):
        assert rel_err(out, ref) < 1e-3, name


@pytest.mark.parametrize("kernel", ["triton", "op"])
def test_forward_saves_logsumexp(device, kernel):
    """The launcher (interpreted on CPU) and the op's kernel for the device (CPU: the reference)."""
    q, k, v = _qkv(2, 3, 50, 33, 24, torch.float32, device, requires_grad=False)
    out, lse2 = (_fwd_triton if kernel == "triton" else _attention_fwd_op)(q, k, v, 0.25)
    scores = (q.double() @ k.double().transpose(-2, -1)) * 0.25  # (B, H, N, M)
    torch.testing.assert_close(lse2.double() * math.log(2), scores.logsumexp(-1), rtol=1e-5, atol=1e-5)
    expected = attention_ref(q.double(), k.double(), v.double(), 0.25)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.transpose(1, 2).is_contiguous(), "output is a (B, H, N, D) view of a (B, N, H, D) buffer"


def test_strided_inputs_and_grad(device):
    """q, k, v as views of one fused qkv projection, and a broadcast (stride-0) output gradient."""
    _needs_fp32_kernel(device)
    B, N, H, D = 2, 37, 3, 16
    qkv = torch.randn(B, N, 3, H, D, device=device).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D), strided
    q, k, v = (t.requires_grad_() for t in qkv.unbind(0))
    assert not q.is_contiguous()
    out = attention(q, k, v, impl="triton")
    out.sum().backward()  # the gradient of sum() arrives expanded, with stride 0
    ref = _fwd_bwd(attention_ref, q.double(), k.double(), v.double(), torch.ones(B, H, N, D, device=device).double())
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), ref, strict=True):
        assert rel_err(a, r) < 1e-5, name


def test_opcheck(device):
    q, k, v = _qkv(1, 2, 19, 21, 24, torch.float32, device)
    torch.library.opcheck(_attention_fwd_op, (q, k, v, 0.2))
    out, lse = _attention_fwd_op(q.detach(), k.detach(), v.detach(), 0.2)
    grad = torch.randn_like(out)
    torch.library.opcheck(_attention_bwd_op, (grad, q.detach(), k.detach(), v.detach(), out, lse, 0.2))
    for kernel in (_bwd_triton, _attention_bwd_op):  # the launcher and the op's kernel for the device
        dq, dk, dv = kernel(grad, q.detach(), k.detach(), v.detach(), out, lse, 0.2)
        expected = torch.autograd.grad(attention_ref(q, k, v, 0.2), (q, k, v), grad)
        for a, e in zip((dq, dk, dv), expected, strict=True):
            assert a.shape == e.shape and a.is_contiguous() and rel_err(a, e) < 1e-5


def test_public_api_names():
    import fastdae
    import fastdae.nn

    assert fastdae.attention is attention and fastdae.nn.Attention is Attention


def test_cpu_backends_agree():
    q, k, v = _qkv(2, 2, 33, 33, 40, torch.float32, "cpu", requires_grad=False)
    ref = attention_ref(q, k, v)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))  # auto on CPU: SDPA
    torch.testing.assert_close(attention(q, k, v, impl="ref"), ref)
    torch.testing.assert_close(attention(q, k, v, impl="sdpa"), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(attention(q, k, v, impl="sdpa"), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "D, expected", [(8, (16, 0)), (16, (16, 0)), (40, (32, 16)), (72, (64, 16)), (96, (64, 32)), (128, (128, 0))]
)
def test_head_chunks(D, expected):
    assert head_chunks(D) == expected


def test_head_chunks_valid_for_every_supported_dim():
    for D in range(8, 129, 8):
        d0, d1 = head_chunks(D)
        for d in (d0, d1) if d1 else (d0,):
            assert d >= 16 and d & (d - 1) == 0, (D, d0, d1)  # tl.dot: powers of two >= 16
        assert D <= d0 + d1 <= max(16, 1 << (D - 1).bit_length()), (D, d0, d1)  # never wider than padding


@pytest.mark.parametrize(
    "shapes, dtypes, match, exc",
    [
        (((2, 2, 8, 16), (2, 2, 8, 16), (2, 2, 9, 16)), None, "k and v must both be", ValueError),
        (((2, 2, 8, 16), (2, 3, 8, 16), (2, 3, 8, 16)), None, r"\(B=2, H=2, M>=1, D=16\)", ValueError),
        (((2, 8, 16), (2, 8, 16), (2, 8, 16)), None, r"q must be \(B, H, N, D\)", ValueError),
        (((2, 2, 8, 16), (2, 2, 0, 16), (2, 2, 0, 16)), None, "M>=1", ValueError),
        (((1, 1, 8, 16),) * 3, (torch.float32, torch.float16, torch.float32), "k must have q's dtype", TypeError),
        (((1, 1, 8, 12),) * 3, None, "multiple of 8", ValueError),
        (((1, 1, 8, 136),) * 3, None, r"multiple of 8 in \[8, 128\]", ValueError),
    ],
)
def test_errors(shapes, dtypes, match, exc):
    dtypes = dtypes or (torch.float32,) * 3
    q, k, v = (torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes, strict=True))
    with pytest.raises(exc, match=match):
        attention(q, k, v, impl="triton")


def test_errors_impl_device_dtype():
    q = torch.zeros(1, 1, 8, 16)
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(q, q, q, impl="flash")
    with pytest.raises(ValueError, match="no C\\+\\+ implementation"):
        attention(q, q, q, impl="cpp")
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        attention(q, q.to("meta"), q)
    with pytest.raises(TypeError, match="impl='triton' takes"):
        attention(q.double(), q.double(), q.double(), impl="triton")
    torch.testing.assert_close(attention(q.double(), q.double(), q.double(), impl="ref"), q.double())


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_missing_is_a_clear_error():
    q = torch.zeros(1, 1, 8, 16)
    with pytest.raises(ImportError, match="impl='xformers' needs the xformers package"):
        attention(q, q, q, impl="xformers")


# ------------------------------------------------------------------------------------------------
# nn.Attention
# ------------------------------------------------------------------------------------------------
def timm_state(dim: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """A state dict in timm's Attention format."""
    state = {
        "qkv.weight": torch.randn(3 * dim, dim) / math.sqrt(dim),
        "proj.weight": torch.randn(dim, dim) / math.sqrt(dim),
        "proj.bias": torch.randn(dim),
    }
    if qkv_bias:
        state["qkv.bias"] = torch.randn(3 * dim)
    return state


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_module_loads_timm_state_and_matches_formula(impl, device):
    if impl == "triton":
        _needs_fp32_kernel(device)
    dim, heads, B, N = 48, 3, 2, 21
    state = timm_state(dim, qkv_bias=True)
    attn = Attention(dim, num_heads=heads, qkv_bias=True, impl=impl).to(device)
    attn.load_state_dict(state)  # strict: same keys, same shapes
    assert attn.head_dim == 16 and attn.scale == 16**-0.5
    x = torch.randn(B, N, dim, device=device)
    # timm's forward, written out: qkv projection, per-head softmax attention, merge heads, proj
    s = {k: t.to(device) for k, t in state.items()}
    q, k, v = (x @ s["qkv.weight"].T + s["qkv.bias"]).reshape(B, N, 3, heads, 16).permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) * 16**-0.5).softmax(-1) @ v  # (B, H, N, D)
    expected = a.transpose(1, 2).reshape(B, N, dim) @ s["proj.weight"].T + s["proj.bias"]
    torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)


def test_module_qk_norm_and_errors():
    attn = Attention(32, num_heads=4, qk_norm=True)
    assert {"q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"} <= set(attn.state_dict())
    assert attn(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(30, num_heads=4)
    with pytest.raises(ValueError, match=r"\(B, N, C=32\)"):
        attn(torch.randn(2, 5, 31))


# ------------------------------------------------------------------------------------------------
# Alignment hints, fallbacks and hostile inputs
# ------------------------------------------------------------------------------------------------
def test_alignment_hint_and_fallback_agree(device):
    """Fused-qkv views with 16-byte rows get ALIGN = 16 bytes of elements; a view whose base is off by
    one element gets the unhinted kernel (ALIGN = 1). Both match the reference."""
    from fastdae.kernels.attention import fwd_launch

    _needs_fp32_kernel(device)
    B, N, H, D = 1, 37, 2, 40
    buf = torch.randn(B * N * 3 * H * D + 1, device=device)
    for offset, align in ((0, 4), (1, 1)):
        qkv = buf[offset : offset + B * N * 3 * H * D].view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o, lse = torch.empty_like(q), torch.empty(B, H, N, device=device)
        assert fwd_launch(q, k, v, o, lse, 0.1).constexprs["ALIGN"] == align
        torch.testing.assert_close(attention(q, k, v, impl="triton"), attention_ref(q, k, v), rtol=1e-5, atol=1e-5)


def test_head_dim_zero_is_a_clear_error():
    q = torch.zeros(1, 1, 4, 0)
    for impl in ("auto", "triton", "ref", "sdpa"):
        with pytest.raises(ValueError, match="head dim D must be >= 1"):
            attention(q, q, q, impl=impl)


def test_auto_on_cpu_keeps_nan_rows_of_q():
    """SDPA's CPU kernel returns a zero row where q has a NaN; auto returns NaN there, like the reference."""
    q, k, v = _qkv(1, 2, 5, 7, 16, torch.float32, "cpu", requires_grad=False)
    q[0, 1, 2, 3] = float("nan")
    q[0, 0, 4, 0] = float("inf")
    out, ref = attention(q, k, v), attention_ref(q, k, v)
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, 1, 2].isnan().all() and out[0, 0, 4].isnan().all()
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("D, dtype", [(12, torch.bfloat16), (136, torch.float16), (64, torch.float32)])
def test_auto_falls_back_to_sdpa_gpu(D, dtype):
    """auto on CUDA: head dims the kernel does not take, and fp32, run SDPA instead of raising or
    running the CUDA-core fp32 kernel."""
    q, k, v = _qkv(2, 2, 33, 33, D, dtype, "cuda", requires_grad=False)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


@pytest.mark.gpu
def test_fp32_triton_is_refused_gpu():
    """No CUDA-core fp32 kernel is reachable through the public function: impl="triton" names SDPA."""
    q, k, v = _qkv(1, 2, 64, 64, 64, torch.float32, "cuda", requires_grad=False)
    with pytest.raises(ValueError, match="impl='sdpa'"):
        attention(q, k, v, impl="triton")


def test_negative_and_zero_scale_match_reference(device):
    """The forward kernel scales after the row max, so it takes scale > 0: the launcher folds a
    negative scale's sign into q and runs a zero scale as zero scores."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = _qkv(1, 2, 37, 29, 16, dtype, device)
    grad = torch.randn(1, 2, 37, 16, device=device, dtype=dtype)
    for scale in (-40.0, 0.0):  # |scores| ~ 600: exp2 overflows unless the max is taken in the right sign
        kernel = _fwd_bwd(attention, q, k, v, grad, scale=scale, impl="triton")
        plain = _fwd_bwd(attention_ref, q, k, v, grad, scale=scale)
        ref64 = _fwd_bwd(attention_ref, q.double(), k.double(), v.double(), grad.double(), scale=scale)
        for name, out, torch_out, ref in zip(("out", "dq", "dk", "dv"), kernel, plain, ref64, strict=True):
            assert_close_to_ref(out, ref, torch_out, f"scale {scale} {name}")


# ------------------------------------------------------------------------------------------------
# GPU only: DiT-sized shapes and torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("N", [1025, 4096])
@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_large_shapes_gpu(N, D, dtype):
    B, H = (2, 8) if N > 2048 else (4, 16)
    q, k, v = _qkv(B, H, N, N, D, dtype, "cuda")
    grad = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
    kernel = _fwd_bwd(attention, q, k, v, grad, impl="triton")
    plain = _fwd_bwd(attention_ref, q, k, v, grad)
    ref64 = _fwd_bwd(attention_ref, q.double(), k.double(), v.double(), grad.double())
    for name, out, torch_out, ref in zip(("out", "dq", "dk", "dv"), kernel, plain, ref64, strict=True):
        assert_close_to_ref(out, ref, torch_out, f"N{N} D{D} {name}")


@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu():
    attn = Attention(144, num_heads=2, qkv_bias=True).cuda()  # head dim 72
    x = torch.randn(2, 100, 144, device="cuda", requires_grad=True)
    compiled = torch.compile(attn, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, attn(x), rtol=1e-4, atol=1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_launchers_pick_the_configs_and_loads_of_the_gpu_they_run_on():
    """sm_90 and newer: the sm_90 lists (wide D=128 tiles) and TMA for aligned one-chunk head dims;
    sm_80 / sm_86: the sm_80 lists and cp.async; D = 72 and unaligned views stay on cp.async."""
    from fastdae.kernels._launch import for_arch
    from fastdae.kernels.attention import _CONFIGS, fwd_launch

    def plan(D: int, arch: int, offset: int = 0):
        buf = torch.empty(2 * 4 * 64 * D + offset, dtype=torch.bfloat16, device="meta")
        q = buf[offset:].view(2, 4, 64, D)
        o, lse = torch.empty_like(q), torch.empty(2, 4, 64, device="meta")
        with for_arch(arch):
            return fwd_launch(q, q, q, o, lse, 0.1)

    for arch, table in ((90, 90), (100, 90), (80, 80), (86, 80)):
        p = plan(128, arch)
        first = p.configs[0]
        assert (dict(first.meta)["BLOCK_M"], dict(first.meta)["BLOCK_N"], first.num_warps, first.num_stages) == (
            _CONFIGS[table][("fwd", 128)][0]
        )
        assert p.constexprs["USE_TMA"] == (table == 90) and (p.pre_hook is not None) == (table == 90)
    assert not plan(72, 90).constexprs["USE_TMA"]  # two register chunks: cp.async wins there
    assert not plan(64, 90, offset=1).constexprs["USE_TMA"]  # a base off by 2 bytes: no TMA
    assert plan(64, 90).constexprs["USE_TMA"]


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("impl", ["auto", "ref", "sdpa"])
def test_a_non_finite_scale_is_refused_not_answered_with_zeros(scale, impl):
    """SDPA's CPU kernel returned zeros for scale=nan where the reference returned NaN."""
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="attention: scale must be a finite number"):
        attention(q, q, q, scale=scale, impl=impl)
