"""Diffusion Transformer (Peebles & Xie, ICCV 2023) over fastdae's fused attention.

    model = DiT_models["DiT-B/2"](input_size=8, in_channels=4, num_classes=10, learn_sigma=True)
    out = model(x, t, y)                        # x (B, C, h, w), t (B,), y (B,) -> (B, 2C, h, w)
    guided = model.forward_with_cfg(x, t, y, cfg_scale=4.0)

Tokens: the latent is cut into p x p patches (a strided conv) plus fixed 2-D sin-cos position
embeddings. Conditioning c = timestep embedding + class embedding drives every block through
adaLN-Zero: each block regresses (shift, scale, gate) for its attention and MLP branches from c,
with the regression zero-initialised, so every block starts as the identity and the whole model
starts by predicting 0. Class labels are dropped to the null class `num_classes` with probability
class_dropout_prob in training, which trains the unconditional model classifier-free guidance needs.

Module and parameter names follow facebookresearch/DiT (x_embedder.proj, t_embedder.mlp,
y_embedder.embedding_table, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2,
adaLN_modulation.1}, final_layer.*, pos_embed), so its checkpoints load with load_state_dict.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from fastdae.nn.attention import Attention

FREQ_EMBED_DIM = 256  # sinusoidal features of the timestep before its MLP
MAX_PERIOD = 10000.0


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, T, C) * (1 + scale) + shift, with shift, scale (B, C) per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(len(pos), dim) = [sin(pos w), cos(pos w)], w_i = 1 / 10000^(i / (dim / 2))."""
    omega = 1.0 / MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """(grid * grid, dim) position embeddings, row-major over the patch grid: half the channels
    encode the row, half the column."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)


class PatchEmbed(nn.Module):
    """(B, C, h, w) -> (B, T, hidden) tokens, T = (h / p) * (w / p), by a p x p stride-p conv."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, hidden, h/p, w/p) -> (B, T, hidden)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) -> (B, hidden): sinusoidal features, then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = FREQ_EMBED_DIM) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int) -> Tensor:
        """(B, dim) = [cos(t f), sin(t f)], f_i = 10000^(-i / (dim / 2)); t may be fractional."""
        half = dim // 2
        freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        emb = self.timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, hidden); row `num_classes` is the null label used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """x + gate_a * Attn(modulate(LN(x))) then x + gate_m * MLP(modulate(LN(x))), modulation from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn_impl: str = "auto") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, impl=attn_impl)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, C)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """(B, T, hidden) -> (B, T, p * p * out_channels) after a last adaLN modulation."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer on (B, in_channels, input_size, input_size) latents.

    num_classes: 0 for an unconditional model (y must be None), else labels in [0, num_classes).
    learn_sigma: output 2 * in_channels channels (the prediction, then the variance interpolation v).
    attn_impl: the fastdae.attention backend of every block.
    """

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 0,
        learn_sigma: bool = False,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"DiT: input_size ({input_size}) must be divisible by patch_size ({patch_size})")
        if hidden_size % num_heads or (hidden_size // 2) % 2:
            raise ValueError(f"DiT: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) and by 4")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        self.grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # fixed sin-cos embedding; a (frozen) parameter as in DiT, so DiT state dicts load unchanged
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, attn_impl=attn_impl) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # transformer layers: Xavier-uniform weights, zero biases (ViT convention)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid).float().unsqueeze(0))
        # patch embedding as the linear map it is: Xavier over its flattened (out, in * p * p) weight
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # embeddings: small normal, as in DiT
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero modulation makes every gate 0, so each block is the identity at init
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # the output layer starts at 0: the first prediction is 0 (the mean of eps / of a centred velocity)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p * p * C) -> (B, C, h, w)."""
        B, p, g, C = x.shape[0], self.patch_size, self.grid, self.out_channels
        x = x.reshape(B, g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * p, g * p)

    def _validate(self, x: Tensor, t: Tensor, y: Tensor | None) -> None:
        shape = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"DiT: x must be (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"DiT: t must be ({x.shape[0]},), got {tuple(t.shape)}")
        if self.y_embedder is None and y is not None:
            raise ValueError("DiT: this model is unconditional (num_classes=0); pass y=None")
        if self.y_embedder is not None and (y is None or y.shape != (x.shape[0],) or y.is_floating_point()):
            raise ValueError(
                f"DiT: y must be integer labels ({x.shape[0]},) in [0, {self.num_classes}], got "
                f"{None if y is None else (y.dtype, tuple(y.shape))}"
            )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, C, h, w), t (B,) timesteps (float or int), y (B,) labels or None -> (B, out_channels, h, w)."""
        self._validate(x, t, y)
        tokens = self.x_embedder(x) + self.pos_embed  # (B, T, hidden)
        c = self.t_embedder(t)  # (B, hidden)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """Classifier-free guidance: eps_u + s (eps_c - eps_u) on the prediction channels, in one batch
        of 2B; the variance channels (learn_sigma) are the conditional ones."""
        if self.y_embedder is None:
            raise ValueError("DiT: classifier-free guidance needs a class-conditional model (num_classes > 0)")
        null = torch.full_like(y, self.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, out_channels, h, w)
        cond, uncond = out.chunk(2)
        C = self.in_channels
        guided = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])
        return torch.cat([guided, cond[:, C:]], dim=1)


# name -> (hidden_size, depth, num_heads): DiT's sizes, and tiny ones that train on a CPU
_SIZES = {"T": (128, 4, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

# "DiT-XL/2" -> DiT with the size's width/depth/heads and patch 2; call it with the remaining
# arguments: DiT_models["DiT-T/2"](input_size=8, in_channels=4, num_classes=10)
DiT_models = {
    f"DiT-{name}/{patch}": functools.partial(DiT, patch_size=patch, hidden_size=h, depth=d, num_heads=nh)
    for name, (h, d, nh) in _SIZES.items()
    for patch in (1, 2, 4)
}
