"""torch.compile readiness of fastdae's public ops: torch.library.opcheck on every custom op behind
vq_nearest, vector_quantize, attention and lpips_head, and a tiny model built from fastdae's drop-in
modules whose compiled (fullgraph=True) outputs and gradients match eager.

The ops run their kernel paths ("triton": real kernels on CUDA, the Triton interpreter on CPU;
"cpp" on CPU tensors where the C++ op is built), since impl="ref" is plain torch with no custom op."""
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

HAS_CPP = {"lpips": _ext.has_op("lpips", "lpips_head_fwd"), "vq": _ext.has_op("vq", "vq_nearest")}
TOL = {"cpu": 1e-5, "cuda": 1e-4}  # float32 relative error; compiled graphs may fuse and reorder float ops


def kernel_impl(stem: str, device: torch.device) -> str:
    """The fastest kernel path on `device`: Triton on CUDA, else C++ when built, else interpreted Triton."""
    return "cpp" if device.type == "cpu" and HAS_CPP.get(stem, False) else "triton"


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


def _lpips_bwd_args(dev: torch.device, impl: str) -> tuple:
    f0, f1, w = _lpips_feats(dev, requires_grad=False)
    return (torch.rand(2, device=dev), f0, f1, w, impl, True, True)


def _vq_args(dev: torch.device) -> tuple[Tensor, Tensor]:
    """37 rows (a partial row block), 10 codes, D = 5: x (N, D) and codebook (K, D), both needing grad."""
    return torch.randn(37, 5, device=dev, requires_grad=True), torch.randn(10, 5, device=dev, requires_grad=True)


# case -> (csrc stem or None, builder(device, impl) -> (op, args)); "cpp" cases run on CPU tensors
OPCHECK_CASES = {
    "vq_nearest": ("vq", lambda d, impl: (_vq_nearest_op, (*_vq_args(d), impl))),
    "vector_quantize": ("vq", lambda d, impl: (_vector_quantize_op, (*_vq_args(d), 0.25, impl))),
    "lpips_head": ("lpips", lambda d, impl: (_lpips_head_op, (*_lpips_feats(d), impl))),
    "lpips_head_backward": ("lpips", lambda d, impl: (_lpips_head_backward_op, _lpips_bwd_args(d, impl))),
    "attention_fwd": (None, lambda d, impl: (_attention_fwd_op, (*_qkv(d), 0.3))),
    "attention_bwd": (None, lambda d, impl: (_attention_bwd_op, _attention_bwd_args(d))),
}


OPCHECK_PARAMS = [(case, "triton") for case in OPCHECK_CASES] + [
    (case, "cpp") for case, (stem, _) in OPCHECK_CASES.items() if stem is not None
]


@pytest.mark.parametrize("case, impl", OPCHECK_PARAMS)
def test_opcheck(case, impl, device):
    stem, build = OPCHECK_CASES[case]
    if impl == "cpp":
        if not HAS_CPP[stem]:
            pytest.skip(f"the C++ op csrc/{stem}.cpp is not built on this machine")
        device = torch.device("cpu")
    op, args = build(device, impl)
    torch.library.opcheck(op, args)


class TinyLatentModel(nn.Module):
    """latent tokens -> fastdae Attention -> VectorQuantizer -> 1x1 conv "decoder" -> LPIPS head vs a target.

    Every fastdae op in one graph, as a user's training step would chain them."""

    def __init__(self, device: torch.device, dim: int = 16, num_codes: int = 8) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads=2, qkv_bias=True, impl="triton")
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
