"""Swap the attention of a DiT/timm-style model for fastdae's with one call.

    python examples/patch_dit_attention.py

The model below is written the way facebookresearch/DiT and timm write theirs (`Attention` with a
fused `qkv` Linear, `proj` and `num_heads`). `patch_attention` finds those modules by structure,
replaces each with `fastdae.nn.Attention` holding the same parameter tensors, and the model's
outputs and gradients stay the same.
"""

import copy

import torch
from torch import nn

from fastdae.integrations import patch_attention
from fastdae.nn import Attention as FastAttention


class Attention(nn.Module):
    """timm's vision_transformer.Attention, as DiT imports it."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=qkv_bias), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(dim=64, num_heads=4) for _ in range(4)])  # (B, N, 64) tokens, head dim 16
    reference = copy.deepcopy(model)

    patch_attention(model)  # in place; the parameters are the same tensors as before

    patched = sum(isinstance(m, FastAttention) for m in model.modules())
    x = torch.randn(2, 64, 64)  # (B, N, C): 8x8 latent patches
    x_ref = x.clone().requires_grad_()
    x_new = x.clone().requires_grad_()
    out_ref, out_new = reference(x_ref), model(x_new)
    out_ref.square().mean().backward()
    out_new.square().mean().backward()
    print(f"patched {patched} attention modules")
    print(f"max |output difference|  {(out_new - out_ref).abs().max().item():.2e}")
    print(f"max |input-grad diff|    {(x_new.grad - x_ref.grad).abs().max().item():.2e}")
    assert patched == 4
    assert torch.allclose(out_new, out_ref, atol=1e-5) and torch.allclose(x_new.grad, x_ref.grad, atol=1e-5)
    print("ok: patched model matches the original")


if __name__ == "__main__":
    main()
