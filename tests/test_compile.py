"""torch.compile readiness of fastdae's public ops: torch.library.opcheck on every custom op behind
vq_nearest, vector_quantize, attention and lpips_head, and a tiny model built from fastdae's drop-in
modules whose compiled (fullgraph=True) outputs and gradients match eager.

The ops run their kernel path (impl="triton": real kernels on CUDA, the Triton interpreter on CPU;
"cpp" where the C++ op is built), since impl="ref" is plain torch and has no custom op to check."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from fastdae import _ext
from fastdae.kernels.attention import _attention_bwd_op, _attention_fwd_op
from fastdae.kernels.lpips import _lpips_head_backward_op, _lpips_head_op, lpips_head
from fastdae.kernels.vq import _vector_quantize_op, _vq_nearest_op
from fastdae.nn import Attention, VectorQuantizer
from utils import rel_err

KERNEL = "triton"
HAS_CPP = {"lpips": _ext.has_op("lpips", "lpips_head_fwd"), "vq": _ext.has_op("vq", "vq_nearest")}
TOL = 1e-5  # float32 relative error; compiled graphs may reorder float ops


def _qkv(B: int = 2, H: int = 2, N: int = 7, M: int = 5, D: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Odd lengths (masked tails), cross-attention shapes (N != M), a non-contiguous q."""
    q = torch.randn(B, N, H, D).transpose(1, 2).requires_grad_()  # (B, H, N, D) strided view
    return q, torch.randn(B, H, M, D, requires_grad=True), torch.randn(B, H, M, D, requires_grad=True)


def _lpips_feats(requires_grad: bool = True) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    shapes = [(3, 5, 7), (16, 2, 3)]  # (C, H, W) per layer
    f0 = [torch.rand(2, *s, requires_grad=requires_grad) for s in shapes]
    f1 = [torch.rand(2, *s, requires_grad=requires_grad) for s in shapes]
    return f0, f1, [torch.rand(s[0]) for s in shapes]


def _vq_args() -> tuple[Tensor, Tensor]:
    """37 rows (a partial row block), 10 codes, D = 5: (x (N, D), codebook (K, D)), both needing grad."""
    return torch.randn(37, 5, requires_grad=True), torch.randn(10, 5, requires_grad=True)


def _attention_bwd_args() -> tuple:
    q, k, v = (t.detach() for t in _qkv())
    o, lse = _attention_fwd_op(q, k, v, 0.3)
    return (torch.randn_like(o), q, k, v, o, lse, 0.3)


def _lpips_bwd_args(impl: str) -> tuple:
    f0, f1, w = _lpips_feats(requires_grad=False)
    return (torch.rand(2), f0, f1, w, impl, True, True)


OPCHECK_CASES = {
    "vq_nearest-triton": lambda: (_vq_nearest_op, (*_vq_args(), "triton")),
    "vq_nearest-cpp": lambda: (_vq_nearest_op, (*_vq_args(), "cpp")),
    "vector_quantize-triton": lambda: (_vector_quantize_op, (*_vq_args(), 0.25, "triton")),
    "vector_quantize-cpp": lambda: (_vector_quantize_op, (*_vq_args(), 0.25, "cpp")),
    "attention_fwd": lambda: (_attention_fwd_op, (*_qkv(), 0.3)),
    "attention_bwd": lambda: (_attention_bwd_op, _attention_bwd_args()),
    "lpips_head-triton": lambda: (_lpips_head_op, (*_lpips_feats(), "triton")),
    "lpips_head_backward-triton": lambda: (_lpips_head_backward_op, _lpips_bwd_args("triton")),
    "lpips_head-cpp": lambda: (_lpips_head_op, (*_lpips_feats(), "cpp")),
    "lpips_head_backward-cpp": lambda: (_lpips_head_backward_op, _lpips_bwd_args("cpp")),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    stem = case.split("_")[0]  # "vq", "vector", "lpips", "attention"
    if case.endswith("-cpp") and not HAS_CPP["lpips" if stem == "lpips" else "vq"]:
        pytest.skip(f"the C++ op behind {case} is not built on this machine")
    op, args = OPCHECK_CASES[case]()
    torch.library.opcheck(op, args)


class TinyLatentModel(nn.Module):
    """latent tokens -> fastdae Attention -> VectorQuantizer -> 1x1 conv "decoder" -> LPIPS head vs a target.

    Every fastdae op in one graph, as a user's training step would chain them."""

    def __init__(self, dim: int = 16, num_codes: int = 8) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads=2, qkv_bias=True, impl=KERNEL)
        self.vq = VectorQuantizer(num_codes, dim, impl="cpp" if HAS_CPP["vq"] else KERNEL)
        self.decode = nn.Conv2d(dim, 8, 1)
        self.register_buffer("lin", torch.rand(8))

    def forward(self, tokens: Tensor, target: Tensor) -> Tensor:
        B, N, C = tokens.shape
        side = int(N**0.5)
        h = self.attn(tokens).transpose(1, 2).reshape(B, C, side, side)  # (B, C, h, w)
        out = self.vq(h)
        feats = torch.relu(self.decode(out.z_q))  # (B, 8, h, w)
        dist = lpips_head([feats], [target], [self.lin], impl="cpp" if HAS_CPP["lpips"] else KERNEL)
        return dist.mean() + out.loss


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_tiny_model_matches_eager(backend):
    torch._dynamo.reset()
    eager = TinyLatentModel()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)  # fullgraph: a graph break fails
    tokens, target = torch.randn(2, 9, 16), torch.rand(2, 8, 3, 3)
    results = []
    for fn, module in ((eager, eager), (compiled, compiled_model)):
        x = tokens.clone().requires_grad_()
        loss = fn(x, target)
        loss.backward()
        results.append((loss, x.grad, {n: p.grad for n, p in module.named_parameters()}))
    (ref, ref_gx, ref_gp), (out, gx, gp) = results
    assert rel_err(out, ref) < TOL
    assert rel_err(gx, ref_gx) < TOL
    for name, g in ref_gp.items():
        assert gp[name] is not None, f"{name}: no gradient through the compiled graph"
        assert rel_err(gp[name], g) < TOL, f"grad of {name}: rel err {rel_err(gp[name], g):.3g}"
