"""torch.compile readiness of fastdae's public ops: torch.library.opcheck on the one op behind each of
vq_nearest, vector_quantize, attention and lpips_head (kernels/_common.py), on the test device's
kernels (CUDA: Triton; CPU: C++ where it builds) and on the CPU's reference kernels without the C++
extension, and a tiny model built from fastdae's drop-in modules whose compiled (fullgraph=True)
outputs and gradients match eager."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fastdae import _ext
from fastdae.kernels.attention import _attention_bwd_op, _attention_fwd_op
from fastdae.kernels.lpips import _lpips_head_backward_op, _lpips_head_op, lpips_head
from fastdae.kernels.vq import _vector_quantize_op, _vq_nearest_op
from fastdae.nn import Attention, VectorQuantizer
from tests.utils import rel_err

HAS_CPP = {"lpips": _ext.available("lpips"), "vq": _ext.available("vq")}
TOL = {"cpu": 1e-5, "cuda": 1e-4}  # float32 relative error; compiled graphs may fuse and reorder float ops


def kernel_impl(stem: str, device: torch.device) -> str:
    """The op's kernel for `device`: Triton on CUDA; on CPU the C++ kernel where it builds, else "auto"
    (the op with its reference kernel; attention: torch's SDPA, as the interpreted Triton path
    does not trace)."""
    if device.type == "cuda":
        return "triton"
    return "cpp" if HAS_CPP.get(stem, False) else "auto"


def _qkv(dev: torch.device, B: int = 2, H: int = 2, N: int = 7, M: int = 5, D: int = 16) -> tuple[Tensor, ...]:
    """Odd lengths (masked tails), cross-attention shapes (N != M), a non-contiguous q."""
    q = torch.randn(B, N, H, D, device=dev).transpose(1, 2).requires_grad_()  # (B, H, N, D) strided view
    k, v = (torch.randn(B, H, M, D, device=dev, requires_grad=True) for _ in range(2))
    return q, k, v


def _attention_bwd_args(dev: torch.device) -> tuple:
    q, k, v = (t.detach() for t in _qkv(dev))
    o, lse = _attention_fwd_op(q, k, v, 0.3)
    return (torch.randn_like(o), q, k, v, o, lse, 0.3)


def _lpips_feats(dev: torch.device, requires_grad: bool = True) -> tuple[list[Tensor], ...]:
    shapes = [(3, 5, 7), (16, 2, 3)]  # (C, H, W) per layer
    f0 = [torch.rand(2, *s, device=dev, requires_grad=requires_grad) for s in shapes]
    f1 = [torch.rand(2, *s, device=dev, requires_grad=requires_grad) for s in shapes]
    return f0, f1, [torch.rand(s[0], device=dev) for s in shapes]


def _lpips_bwd_args(dev: torch.device) -> tuple:
    f0, f1, w = _lpips_feats(dev, requires_grad=False)
    return (torch.rand(2, device=dev), f0, f1, w, True, True)


def _vq_args(dev: torch.device) -> tuple[Tensor, Tensor]:
    """37 rows (a partial row block), 10 codes, D = 5: x (N, D) and codebook (K, D), both needing grad."""
    return torch.randn(37, 5, device=dev, requires_grad=True), torch.randn(10, 5, device=dev, requires_grad=True)


# case -> builder(device) -> (op, args). On CUDA the ops run their Triton kernels; on CPU their C++
# kernels where csrc builds (else the references; test_ops_without_the_cpp_extension covers those).
OPCHECK_CASES = {
    "vq_nearest": lambda d: (_vq_nearest_op, _vq_args(d)),
    "vector_quantize": lambda d: (_vector_quantize_op, (*_vq_args(d), 0.25)),
    "lpips_head": lambda d: (_lpips_head_op, _lpips_feats(d)),
    "lpips_head_backward": lambda d: (_lpips_head_backward_op, _lpips_bwd_args(d)),
    "attention_fwd": lambda d: (_attention_fwd_op, (*_qkv(d), 0.3)),
    "attention_bwd": lambda d: (_attention_bwd_op, _attention_bwd_args(d)),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, device):
    op, args = OPCHECK_CASES[case](device)
    torch.library.opcheck(op, args)


def test_ops_without_the_cpp_extension():
    """FASTDAE_NO_EXT=1 (as after a failed build): the CPU kernels of the C++-backed ops are the
    references, which pass opcheck and give the references' values; impl='cpp' says what is missing."""
    code = """
import torch
from fastdae.kernels import lpips, vq
x, c = torch.randn(37, 5, requires_grad=True), torch.randn(10, 5, requires_grad=True)
torch.library.opcheck(vq._vq_nearest_op, (x, c))
torch.library.opcheck(vq._vector_quantize_op, (x, c, 0.25))
sqdist, idx = vq._vq_nearest_op(x, c)
ref_idx, ref_dist = vq.vq_nearest_ref(x, c)
assert torch.equal(idx, ref_idx) and torch.equal(sqdist, ref_dist)
f0, f1 = ([torch.rand(2, *s) for s in ((3, 5, 7), (16, 2, 3))] for _ in range(2))
w = [torch.rand(f.shape[1]) for f in f0]
torch.library.opcheck(lpips._lpips_head_op, ([f.clone().requires_grad_() for f in f0], f1, w))
torch.library.opcheck(lpips._lpips_head_backward_op, (torch.rand(2), f0, f1, w, True, True))
torch.testing.assert_close(lpips._lpips_head_op(f0, f1, w), lpips.lpips_head_ref(f0, f1, w))
try:
    vq.vq_nearest(x, c, impl="cpp")
    raise AssertionError("impl='cpp' ran without the C++ extension")
except RuntimeError as err:
    assert "needs the C++ kernels of csrc/vq.cpp" in str(err), err
"""
    env = dict(os.environ, FASTDAE_NO_EXT="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


class TinyLatentModel(nn.Module):
    """latent tokens -> fastdae Attention -> VectorQuantizer -> 1x1 conv "decoder" -> LPIPS head vs a target.

    Every fastdae op in one graph, as a user's training step would chain them."""

    def __init__(self, device: torch.device, dim: int = 16, num_codes: int = 8) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads=2, qkv_bias=True, impl=kernel_impl("attention", device))
        self.vq = VectorQuantizer(num_codes, dim, impl=kernel_impl("vq", device))
        self.decode = nn.Conv2d(dim, 8, 1)
        self.register_buffer("lin", torch.rand(8))
        self.lpips_impl = kernel_impl("lpips", device)

    def forward(self, tokens: Tensor, target: Tensor) -> Tensor:
        B, N, C = tokens.shape
        side = int(N**0.5)
        h = self.attn(tokens).transpose(1, 2).reshape(B, C, side, side)  # (B, C, h, w)
        out = self.vq(h)
        feats = torch.relu(self.decode(out.z_q))  # (B, 8, h, w)
        dist = lpips_head([feats], [target], [self.lin], impl=self.lpips_impl)
        return dist.mean() + out.loss


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_tiny_model_matches_eager(backend, device):
    torch._dynamo.reset()
    eager = TinyLatentModel(device).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)  # fullgraph: a graph break fails
    tokens, target = torch.randn(2, 9, 16, device=device), torch.rand(2, 8, 3, 3, device=device)
    results = []
    for fn, module in ((eager, eager), (compiled, compiled_model)):
        x = tokens.clone().requires_grad_()
        loss = fn(x, target)
        loss.backward()
        results.append((loss, x.grad, {n: p.grad for n, p in module.named_parameters()}))
    (ref, ref_gx, ref_gp), (out, gx, gp) = results
    tol = TOL[device.type]
    assert rel_err(out, ref) < tol
    assert rel_err(gx, ref_gx) < tol
    for name, g in ref_gp.items():
        assert gp[name] is not None, f"{name}: no gradient through the compiled graph"
        assert rel_err(gp[name], g) < tol, f"grad of {name}: rel err {rel_err(gp[name], g):.3g}"
