"""VQGAN-style convolutional autoencoder (Esser et al., 2021; Rombach et al., 2022) with VQ or KL bottleneck.

    x (B, 3, H, W) -> Encoder -> h (B, C_h, H/f, W/f) -> Bottleneck -> z (B, C_z, H/f, W/f) -> Decoder -> x_hat

f = 2 ** (len(ch_mult) - 1). The DAE's weak auxiliary decoder (docs/paper.md §2) is the same `Decoder`
built from a weakened config (`WeakDecoderConfig`: width multiplier, residual blocks per level,
Dropout2d after every residual block); `build_decoder` builds a decoder alone, so stage 2 never
constructs (or loads) the encoder.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BOTTLENECKS = ("vq", "kl")
MAX_HEAD_DIM = 128  # fastdae.attention's largest head dim
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp: keeps exp(logvar) finite in fp32


@dataclass
class AutoencoderConfig:
    """Encoder/decoder shape and bottleneck. `ch_mult[i]` is the width of level i in units of `ch`;
    every level after the first halves the resolution. `attn` adds self-attention to the mid block
    (the lowest resolution). VQ: `num_codes` codes of dim `z_channels`; KL: Gaussian posterior with
    `z_channels` channels and weight `kl_weight` on KL(q || N(0, I)). `linear_skip` adds to every
    decoder (full and weak) a linear path from the latent to the pixels (Decoder.skip)."""

    bottleneck: str = "vq"
    ch: int = 64
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    z_channels: int = 4
    attn: bool = False
    num_codes: int = 256
    vq_beta: float = 0.25
    vq_ema: bool = False
    kl_weight: float = 1e-6
    linear_skip: bool = False

    def __post_init__(self) -> None:
        self.ch_mult = [int(m) for m in self.ch_mult]
        if self.bottleneck not in BOTTLENECKS:
            raise ValueError(f"AutoencoderConfig.bottleneck must be one of {BOTTLENECKS}, got {self.bottleneck!r}")
        if not self.ch_mult or min(self.ch_mult) < 1 or self.ch < 1 or self.z_channels < 1:
            raise ValueError(
                f"AutoencoderConfig: ch, z_channels and every ch_mult entry must be >= 1, got "
                f"ch={self.ch}, z_channels={self.z_channels}, ch_mult={self.ch_mult}"
            )
        if self.num_res_blocks < 1:
            raise ValueError(f"AutoencoderConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class WeakDecoderConfig:
    """How the auxiliary decoder of stage 1 is weakened (docs/paper.md §2): channels x `width_mult`,
    `num_res_blocks` per level (None: the full decoder's), Dropout2d(`dropout`) after each residual block."""

    width_mult: float = 0.5
    num_res_blocks: int | None = 1
    dropout: float = 0.3  # picked by the ablation in results/shapes-ablation-dropout (results/README.md)

    def __post_init__(self) -> None:
        if not 0 < self.width_mult <= 1:
            raise ValueError(f"WeakDecoderConfig.width_mult must be in (0, 1], got {self.width_mult}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"WeakDecoderConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_res_blocks is not None and self.num_res_blocks < 1:
            raise ValueError(f"WeakDecoderConfig.num_res_blocks must be >= 1 or None, got {self.num_res_blocks}")


# Size registry (VQGAN's f=16 model is AE-B/16; the small ones fit a CPU).
AE_SIZES: dict[str, dict[str, Any]] = {
    "AE-T/4": dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1),
    "AE-S/4": dict(ch=64, ch_mult=[1, 2, 2], num_res_blocks=2),
    "AE-S/8": dict(ch=64, ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn=True),
    "AE-B/8": dict(ch=128, ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn=True),
    "AE-B/16": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn=True),
}


def autoencoder_config(size: str, **overrides: Any) -> AutoencoderConfig:
    """AutoencoderConfig of a registered size, e.g. autoencoder_config("AE-S/8", bottleneck="kl")."""
    if size not in AE_SIZES:
        raise ValueError(f"unknown autoencoder size {size!r}; known: {sorted(AE_SIZES)}")
    return AutoencoderConfig(**{**AE_SIZES[size], **overrides})


def _norm(channels: int) -> nn.GroupNorm:
    # VQGAN's 32 groups, but never fewer than 4 channels per group (gcd(32, channels // 4) groups):
    # narrow layers (ch=16: 16 and 32 channels) would otherwise get one channel per group, i.e.
    # instance norm, which erases each channel's per-image mean and scale -- the colour and
    # brightness of a flat shape (results/prior-diagnosis). Widths >= 128 keep VQGAN's 32 groups.
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 shortcut when the width changes."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions (VQGAN's mid-block attention) through fastdae.attention."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        # fewest heads whose dim fits the fused kernel (dims are multiples of 8 up to 128)
        self.heads = next(h for h in range(1, ch + 1) if ch % h == 0 and ch // h <= MAX_HEAD_DIM)
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        from fastdae.kernels.attention import attention  # lazy: only models with attn=True load the kernel module

        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)  # (B, 3, nh, hd, N)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, nh, N, hd)
        o = attention(q, k, v)  # (B, nh, N, hd)
        return x + self.proj(o.transpose(-1, -2).reshape(B, C, H, W))


def _mid_block(ch: int, attn: bool) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(ch, ch), *([AttnBlock(ch)] if attn else []), ResnetBlock(ch, ch))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, out_channels, H/f, W/f)."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, out_channels: int, attn: bool = False) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        layers: list[nn.Module] = []
        width = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(width, ch * mult))
                width = ch * mult
            if level < len(ch_mult) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))  # downsample x2
        self.down = nn.Sequential(*layers)
        self.mid = _mid_block(width, attn)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f). `dropout` > 0 puts Dropout2d after every residual
    block (the weak auxiliary decoder); the full decoder has none. `linear_skip` adds `skip`, a
    transposed convolution with kernel = stride = f (each latent pixel -> an f x f RGB patch), to the
    output: the linear part of the map (a patch's mean colour) trains in a few hundred steps through it,
    where the deep path alone learns colour last (results/prior-diagnosis, third pass). It starts at
    zero: a fresh decoder computes what one without it does."""

    def __init__(
        self,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        z_channels: int,
        attn: bool = False,
        dropout: float = 0.0,
        linear_skip: bool = False,
    ) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _mid_block(width, attn)
        layers: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(width, ch * ch_mult[level]))
                width = ch * ch_mult[level]
                if dropout > 0:
                    layers.append(nn.Dropout2d(dropout))
            if level > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)
        self.skip: nn.ConvTranspose2d | None = None
        if linear_skip:
            f = 2 ** (len(ch_mult) - 1)
            self.skip = nn.ConvTranspose2d(z_channels, 3, f, stride=f)
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)

    @property
    def last_layer(self) -> Tensor:
        """W_last of the adaptive GAN weight (docs/paper.md §3)."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        x = self.conv_out(F.silu(self.norm_out(h)))
        return x if self.skip is None else x + self.skip(z)


class VQBottleneck(nn.Module):
    """Vector quantisation with the straight-through estimator (fastdae.nn.VectorQuantizer)."""

    in_factor = 1  # encoder output channels per latent channel

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        from fastdae.nn import VectorQuantizer

        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.z_channels, beta=cfg.vq_beta, ema=cfg.vq_ema)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, D, h, w) -> z_q (B, D, h, w), loss = ||sg[z_e] - z_q||^2 + beta ||z_e - sg[z_q]||^2."""
        out = self.quantizer(h)
        return out.z_q, out.loss

    @torch.no_grad()
    def encode_fields(self, h: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """What the cache stores: code indices (B, h, w) int64; latent stats are over z_q (B, D, h, w)."""
        out = self.quantizer(h)
        return {"indices": out.indices}, out.z_q

    def latent(self, fields: dict[str, Tensor], sample: bool = True) -> Tensor:
        """Cached fields -> decoder input: the (frozen) codebook vectors of the indices, (B, D, h, w)."""
        return self.quantizer.embed(fields["indices"].long())


class KLBottleneck(nn.Module):
    """Diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)) with the reparameterisation trick."""

    in_factor = 2  # mean and logvar

    @staticmethod
    def _moments(h: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = h.chunk(2, dim=1)  # (B, C, h, w) each
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, 2C, h, w) -> z (B, C, h, w), KL(q || N(0, I)) summed over latent dims, mean over batch."""
        mean, logvar = self._moments(h)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        return z, kl

    @torch.no_grad()
    def encode_fields(self, h: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The cache keeps mean and logvar so that every epoch draws a fresh z; stats are over the mean."""
        mean, logvar = self._moments(h)
        return {"mean": mean, "logvar": logvar}, mean

    def latent(self, fields: dict[str, Tensor], sample: bool = True) -> Tensor:
        """Cached fields -> z ~ q(z|x) (B, C, h, w), a fresh draw per call; sample=False gives the mean."""
        mean = fields["mean"].float()
        if not sample:
            return mean
        return mean + torch.exp(0.5 * fields["logvar"].float()) * torch.randn_like(mean)


def build_bottleneck(cfg: AutoencoderConfig) -> VQBottleneck | KLBottleneck:
    return VQBottleneck(cfg) if cfg.bottleneck == "vq" else KLBottleneck()


def build_encoder(cfg: AutoencoderConfig) -> Encoder:
    factor = VQBottleneck.in_factor if cfg.bottleneck == "vq" else KLBottleneck.in_factor
    return Encoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, factor * cfg.z_channels, cfg.attn)


def build_decoder(cfg: AutoencoderConfig, weak: WeakDecoderConfig | None = None) -> Decoder:
    """The full decoder (weak=None) or the weakened auxiliary decoder; never builds an encoder."""
    if weak is None:
        return Decoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.attn, linear_skip=cfg.linear_skip)
    asked = cfg.ch * weak.width_mult
    ch = max(8, round(asked / 8) * 8)  # multiples of 8 keep GroupNorm and kernels happy
    if ch != asked:  # e.g. ch=16: width_mult 0.25 and 0.5 both give 8 channels, the same decoder
        warnings.warn(
            f"weak decoder: width_mult={weak.width_mult} x ch={cfg.ch} = {asked:g} channels, "
            f"rounded to {ch} (a multiple of 8, at least 8)",
            stacklevel=2,
        )
    blocks = weak.num_res_blocks or cfg.num_res_blocks
    return Decoder(ch, cfg.ch_mult, blocks, cfg.z_channels, cfg.attn, weak.dropout, cfg.linear_skip)


class Autoencoder(nn.Module):
    """Encoder + bottleneck + decoder for stage 1 (and the joint/control arms)."""

    def __init__(self, cfg: AutoencoderConfig, decoder: Decoder) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.bottleneck = build_bottleneck(cfg)
        self.decoder = decoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 3, H, W) -> (x_hat (B, 3, H, W), bottleneck loss term to add to the per-pixel mean loss).

        KL: LDM weighs kl_weight * KL_sum against a reconstruction loss summed over pixels; our
        reconstruction loss is a per-pixel mean, so the KL sum is divided by 3*H*W to keep LDM's ratio."""
        z, aux = self.bottleneck(self.encoder(x))
        if self.cfg.bottleneck == "kl":
            aux = self.cfg.kl_weight * aux / x[0].numel()
        return self.decoder(z), aux

    @torch.no_grad()
    def encode_fields(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The cache step's `encode`: images -> (fields to store, latents for the channel statistics)."""
        return self.bottleneck.encode_fields(self.encoder(x))
