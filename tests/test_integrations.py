"""fastdae.integrations: patch_attention (timm/DiT-style modules) and the diffusers processor, each
checked against the unpatched model's outputs and every gradient (inputs and parameters)."""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdae.integrations import FastDAEAttnProcessor
from utils import rel_err

TOL = 1e-5  # float32 relative error: the patched path and the original run the same math in fp32


def assert_same_outputs_and_grads(ref_model: nn.Module, model: nn.Module, run, inputs: list[Tensor]) -> None:
    """run(model, *inputs) -> Tensor on both models; compares output, input grads, parameter grads by name.

    A gradient that is zero in exact arithmetic (e.g. the key bias: softmax ignores a per-row shift)
    is rounding noise on both sides, so each error is relative to max(||ref||, 1e-3 * the largest grad norm)."""
    outs = []
    for m in (ref_model, model):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = run(m, *xs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # a non-uniform upstream grad
        grads = {f"input {i}": x.grad for i, x in enumerate(xs) if x.is_floating_point()}
        grads.update({name: p.grad for name, p in m.named_parameters()})
        outs.append((out, grads))
    (ref, ref_grads), (out, grads) = outs
    assert rel_err(out, ref) < TOL, f"output: rel err {rel_err(out, ref):.3g}"
    assert grads.keys() == ref_grads.keys()
    floor = 1e-3 * max(g.norm().item() for g in ref_grads.values() if g is not None)
    for name, r in ref_grads.items():
        if r is None:  # unused by the reference too (e.g. an embedding row)
            continue
        assert grads[name] is not None, f"{name}: no gradient after patching"
        err = (grads[name] - r).norm().item() / max(r.norm().item(), floor)
        assert err < TOL, f"grad of {name}: rel err {err:.3g}"


def test_integrations_import_no_third_party():
    """Importing fastdae and its integrations must not import diffusers or timm."""
    code = (
        "import sys, fastdae, fastdae.integrations as I;"
        "import fastdae.integrations.diffusers, fastdae.integrations.export;"
        "bad = [m for m in ('diffusers', 'timm', 'torchvision') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")


def tiny_unet(diffusers) -> nn.Module:
    """UNet2DConditionModel with self- and cross-attention (query 16/4 tokens, context 5 tokens), ~0.2M params."""
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, cross_attention_dim=24,
    ).eval()


def run_unet(model: nn.Module, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
    return model(x, 3, encoder_hidden_states=context, encoder_attention_mask=mask).sample


def test_diffusers_processor_unet_cross_attention(diffusers):
    ref = tiny_unet(diffusers)
    model = copy.deepcopy(ref)
    model.set_attn_processor(FastDAEAttnProcessor())
    assert {type(p) for p in model.attn_processors.values()} == {FastDAEAttnProcessor}
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mask: fastdae.attention runs, no fallback warning
        assert_same_outputs_and_grads(ref, model, run_unet, [x, context])


def test_diffusers_processor_dit(diffusers):
    """DiTTransformer2DModel has no set_attn_processor: set each Attention's processor."""
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()
    model = copy.deepcopy(ref)
    patched = [m.set_processor(FastDAEAttnProcessor()) for m in model.modules() if hasattr(m, "set_processor")]
    assert len(patched) == 2
    labels, t = torch.tensor([0, 3]), torch.tensor([1, 7])
    assert_same_outputs_and_grads(
        ref, model, lambda m, x: m(x, timestep=t, class_labels=labels).sample, [torch.randn(2, 4, 8, 8)]
    )


def test_diffusers_processor_mask_falls_back_with_reason(diffusers):
    ref = tiny_unet(diffusers)
    model = copy.deepcopy(ref)
    model.set_attn_processor(FastDAEAttnProcessor())
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.warns(UserWarning, match="attention_mask was given"):
        out = run_unet(model, x, context, mask)
    expected = run_unet(ref, x, context, mask)
    assert rel_err(out, expected) < TOL
    assert rel_err(out, run_unet(ref, x, context)) > 1e-3, "the mask must change the output"


def test_diffusers_processor_honours_attn_scale(diffusers):
    """A model built with scale_qk=False has attn.scale = 1: the processor uses it (AttnProcessor2_0 does not)."""
    attn = diffusers.models.attention_processor.Attention(query_dim=16, heads=2, dim_head=8, scale_qk=False)
    x = torch.randn(2, 6, 16)
    out = FastDAEAttnProcessor()(attn, x)
    q, k, v = (lin(x).view(2, 6, 2, 8).transpose(1, 2) for lin in (attn.to_q, attn.to_k, attn.to_v))
    core = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(2, 6, 16)
    assert rel_err(out, attn.to_out[0](core)) < TOL
