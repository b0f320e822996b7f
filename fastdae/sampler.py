"""`Sampler`: a trained DiT prior + a decoder, ready to turn class labels and noise into images. It
needs no run folder (fastdae.training.samples.build_sampler builds one from a run; anything that
holds the weights can build one directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastdae.kernels.vq import vq_nearest
from fastdae.models.autoencoder import VQBottleneck
from fastdae.models.diffusion import Diffusion, Generators, LatentScaler
from fastdae.models.dit import DiT
from fastdae.precision import autocast


@dataclass
class Sampler:
    """A trained prior + decoder, ready to turn labels and noise generators into images.

    scaler maps the DiT's unit-variance latents back to the decoder's; with a VQ bottleneck
    (`bottleneck` set) samples are snapped to their nearest code before decoding (docs/design.md)."""

    dit: DiT
    decoder: nn.Module
    scaler: LatentScaler
    diffusion: Diffusion
    bottleneck: VQBottleneck | None  # the frozen VQ bottleneck, None for KL latents
    steps: int
    sampler: str
    cfg_scale: float
    clip_x0: float  # 0: off
    precision: str
    device: torch.device
    identity: dict[str, Any]  # what the samples depend on besides the noise: weights' sha256, settings

    @property
    def num_classes(self) -> int:
        return self.dit.num_classes

    @torch.no_grad()
    def images(self, n: int, labels: Tensor | None, generator: Generators) -> Tensor:
        """n images (n, 3, H, W) float in [-1, 1] on the device. labels (n,) or None (unconditional);
        generator: one for the batch, or one per sample (Diffusion.sample)."""
        B, C, h = n, self.dit.in_channels, self.dit.input_size
        y = labels.to(self.device) if labels is not None else None
        with autocast(self.device, self.precision, "samples"):
            z = self.diffusion.sample(
                self.dit,
                (B, C, h, h),
                y=y,
                steps=self.steps,
                sampler=self.sampler,
                cfg_scale=self.cfg_scale,
                generator=generator,
                device=self.device,
                clip_x0=self.clip_x0 or None,
            )
        z = self.scaler.denormalize(z.float())  # (B, C, h, h) in the decoder's latent scale
        if self.bottleneck is not None:
            idx, _ = vq_nearest(z.permute(0, 2, 3, 1).reshape(-1, C), self.bottleneck.quantizer.codebook)  # (B*h*h,)
            z = self.bottleneck.latent({"indices": idx.view(B, h, h)})
        with autocast(self.device, self.precision):  # no stage: the autoencoder's policy (fastdae.precision)
            return self.decoder(z).float().clamp(-1, 1)  # (B, 3, H, W)

    def generate(self, n: int, labels: Tensor | None, generator: Generators) -> Tensor:
        """`images`, as (n, H, W, 3) uint8 on the CPU."""
        return to_uint8(self.images(n, labels, generator))


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU, rounded to the nearest level."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()
