"""Multi-head self-attention over fastdae.attention, a drop-in for timm's / DiT's `Attention`.

    attn = Attention(dim=1152, num_heads=16, qkv_bias=True)     # DiT-XL block attention, head dim 72
    attn.load_state_dict(timm_attention.state_dict())           # same parameter names as timm
    y = attn(x)                                                  # x (B, N, C) -> (B, N, C)

Parameters: `qkv` Linear(dim, 3 dim), optional `q_norm`/`k_norm` (qk_norm, per head), `proj`
Linear(dim, dim); `attn_drop`/`proj_drop` Dropout. The fused kernel has no dropout on attention
probabilities: with attn_drop > 0 in training, the forward uses torch's SDPA with dropout_p instead.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fastdae.kernels.attention import attention


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.impl = impl  # fastdae.attention backend: "auto" | "triton" | "ref" | "sdpa" | "xformers"
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"Attention: x must be (B, N, C={self.qkv.in_features}), got {tuple(x.shape)}")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k, v = qkv.unbind(0)  # (B, H, N, D) strided views, read in place by the kernel
        q, k = self.q_norm(q), self.k_norm(k)
        if self.training and self.attn_drop.p > 0:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p, scale=self.scale)
        else:
            x = attention(q, k, v, scale=self.scale, impl=self.impl)  # (B, H, N, D)
        x = x.transpose(1, 2).reshape(B, N, C)  # free for the kernel's (B, N, H, D) output layout
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, impl={self.impl!r}"
