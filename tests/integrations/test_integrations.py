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

from fastdae.integrations import FastDAEAttnProcessor, patch_attention
from fastdae.nn import Attention
from tests.utils import assert_close_to_ref, rel_err

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


def assert_kernel_path_within_2x(ref_model: nn.Module, model: nn.Module, run, x: Tensor) -> None:
    """CUDA: the patched model (Triton kernel) vs a float64 copy of the original, within 2x the error
    of the original in float32 (flash-attention's rule), for the output and the input gradient."""
    results = []
    for m, dtype in ((copy.deepcopy(ref_model).double(), torch.float64), (ref_model, x.dtype), (model, x.dtype)):
        xi = x.detach().to(dtype).requires_grad_()
        out = run(m, xi)
        out.square().mean().backward()
        results.append((out, xi.grad))
    (out64, g64), (out32, g32), (out, g) = results
    assert_close_to_ref(out, out64, out32, "output")
    assert_close_to_ref(g, g64, g32, "input grad")


def test_integrations_import_no_third_party_and_no_trainer(tmp_path):
    """Importing every integration and loading an export imports neither diffusers/timm nor fastdae.training.

    One subprocess for both checks: a fresh interpreter costs seconds on a shared CPU."""
    from fastdae.integrations.export import save_pretrained
    from fastdae.models.autoencoder import AutoencoderConfig, build_decoder

    cfg = AutoencoderConfig(bottleneck="kl", ch=8, ch_mult=[1], num_res_blocks=1)
    save_pretrained(build_decoder(cfg), tmp_path, cfg)
    code = (
        "import sys, fastdae, fastdae.integrations as I;"
        "import fastdae.integrations.attention, fastdae.integrations.diffusers;"
        f"I.load_pretrained({str(tmp_path)!r});"
        "bad = [m for m in ('diffusers', 'timm', 'torchvision', 'fastdae.training') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# patch_attention: local replicas of timm's Attention (timm needs torchvision here) and DiT's
# ---------------------------------------------------------------------------------------------
class TimmAttention(nn.Module):
    """timm >= 1.0 vision_transformer.Attention, written out (same attribute names and forward)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(x))


class DiTAttention(nn.Module):
    """The timm 0.6 Attention that facebookresearch/DiT imports: no head_dim, no q/k norm, explicit softmax."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))  # (B, H, N, N)
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block, as in timm's ViT and DiT (without adaLN)."""

    def __init__(self, attn: nn.Module, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), attn, nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def tiny_vit(make_attn, dim: int = 32, depth: int = 2) -> nn.Module:
    return nn.Sequential(*[Block(make_attn(dim), dim) for _ in range(depth)])


ATTENTIONS = {
    "timm": lambda dim: TimmAttention(dim, num_heads=4),
    "timm_qkv_bias_qk_norm": lambda dim: TimmAttention(dim, num_heads=2, qkv_bias=True, qk_norm=True),
    "dit": lambda dim: DiTAttention(dim, num_heads=4, qkv_bias=True),
}


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_patch_attention_matches_unpatched(kind):
    ref = tiny_vit(ATTENTIONS[kind]).eval()
    model = copy.deepcopy(ref)
    params_before = {name: p for name, p in model.named_parameters()}
    assert patch_attention(model) is model
    patched = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(patched) == 2 and not any(isinstance(m, (TimmAttention, DiTAttention)) for m in model.modules())
    # the very same parameter tensors under the same names: optimizers and state dicts keep working
    assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in params_before.items()}
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert_same_outputs_and_grads(ref, model, lambda m, x: m(x), [torch.randn(2, 13, 32)])


def test_patch_attention_attn_drop_in_training():
    """attn_drop > 0 while training: same dropout draws as timm's SDPA path under the same seed."""
    ref = tiny_vit(lambda dim: TimmAttention(dim, num_heads=4, attn_drop=0.5)).train()
    model = patch_attention(copy.deepcopy(ref))
    x = torch.randn(2, 9, 32)
    outs = []
    for m in (ref, model):
        torch.manual_seed(1)
        outs.append(m(x))
    assert rel_err(outs[1], outs[0]) < TOL
    torch.manual_seed(2)
    assert rel_err(model(x), outs[1]) > 1e-3, "dropout must be active in training mode"
    assert rel_err(model.eval()(x), ref.eval()(x)) < TOL


def test_patch_attention_keeps_impl_scale_and_mode():
    attn = DiTAttention(32, num_heads=4)
    attn.scale = 0.3  # a non-default scale is carried over
    model = patch_attention(nn.Sequential(attn).train(), impl="ref")
    assert model[0].impl == "ref" and model[0].scale == 0.3 and model[0].training
    x = torch.randn(2, 5, 32)
    assert rel_err(model(x), attn(x)) < TOL


def test_patch_attention_root_and_shared_modules():
    root = TimmAttention(16, num_heads=2)
    patched = patch_attention(root)
    assert isinstance(patched, Attention) and patched.qkv is root.qkv
    shared = TimmAttention(16, num_heads=2)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    patch_attention(model)
    assert model["a"][0] is model["b"][0] and isinstance(model["a"][0], Attention)


class RelPosAttention(TimmAttention):
    """A BEiT-like variant: a learned relative position bias that fastdae.attention cannot add."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, num_heads=2)
        self.rel_pos_bias = nn.Parameter(torch.zeros(2, 4, 4))


class RopeAttention(TimmAttention):
    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        return super().forward(x)


class ScaleNormAttention(TimmAttention):
    def __init__(self, dim: int) -> None:
        super().__init__(dim, num_heads=2)
        self.norm = nn.LayerNorm(dim)


class WideHeadAttention(TimmAttention):
    """timm's attn_head_dim option: inner width 2C differs from the model width C."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, num_heads=2)
        self.qkv, self.proj = nn.Linear(dim, 6 * dim), nn.Linear(2 * dim, dim)


@pytest.mark.parametrize(
    "make, match",
    [
        (RelPosAttention, r"own parameters.*rel_pos_bias"),
        (RopeAttention, r"forward arguments.*rope"),
        (ScaleNormAttention, r"non-identity `norm`"),
        (WideHeadAttention, r"qkv must be Linear\(16, 48\)"),
    ],
)
def test_patch_attention_refuses_what_it_cannot_reproduce(make, match):
    model = nn.Sequential(TimmAttention(16, num_heads=2), nn.Sequential(make(16)))
    with pytest.raises(ValueError, match=rf"1\.0 \({make.__name__}\): .*{match}"):
        patch_attention(model)
    assert isinstance(model[0], TimmAttention), "nothing is patched when any module is refused"


def test_patch_attention_errors():
    with pytest.raises(ValueError, match="no timm/DiT-style attention module"):
        patch_attention(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="must be an nn.Module"):
        patch_attention(lambda x: x)
    model = patch_attention(nn.Sequential(TimmAttention(16, num_heads=2)))
    with pytest.raises(ValueError, match="takes no mask"):
        model[0](torch.randn(1, 3, 16), attn_mask=torch.zeros(3, 3))


def test_patch_attention_timm_vision_transformer():
    timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision)")
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5
    ).eval()
    model = patch_attention(copy.deepcopy(ref))
    assert sum(isinstance(m, Attention) for m in model.modules()) == 2
    assert_same_outputs_and_grads(ref, model, lambda m, x: m(x), [torch.randn(2, 3, 16, 16)])


@pytest.mark.gpu
def test_patch_attention_cuda_kernel():
    ref = tiny_vit(ATTENTIONS["timm_qkv_bias_qk_norm"]).cuda().eval()
    model = patch_attention(copy.deepcopy(ref))  # impl="auto": the Triton kernel on CUDA
    assert_kernel_path_within_2x(ref, model, lambda m, x: m(x), torch.randn(2, 77, 32, device="cuda"))


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")


def tiny_unet(diffusers) -> nn.Module:
    """UNet2DConditionModel with self- and cross-attention (query 16/4 tokens, context 5 tokens), ~0.2M params."""
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=24,
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
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
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


@pytest.mark.gpu
def test_diffusers_processor_cuda_kernel(diffusers):
    ref = tiny_unet(diffusers).cuda()
    model = copy.deepcopy(ref)
    model.set_attn_processor(FastDAEAttnProcessor())
    context = torch.randn(2, 5, 24, device="cuda")
    run = lambda m, x: run_unet(m, x, context.to(x.dtype))  # noqa: E731
    assert_kernel_path_within_2x(ref, model, run, torch.randn(2, 4, 8, 8, device="cuda"))
