"""PatchGAN discriminator (Isola et al., 2017; VQGAN's NLayerDiscriminator), hinge loss and the
adaptive generator weight of docs/paper.md §3:

    lambda = clamp(||grad_W L_rec|| / (||grad_W L_G|| + 1e-4), 0, 1e4) * disc_weight,   W = last decoder layer
    L_D = 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]),   L_G = -E[D(x_hat)]

Both terms are off before the warm-up step `start` (the generator learns to reconstruct first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRAD_EPS = 1e-4
MAX_ADAPTIVE_WEIGHT = 1e4


@dataclass
class DiscriminatorConfig:
    """`n_layers` stride-2 convs of width ndf * 2**i (capped at 8 ndf); each output logit sees a
    patch. `start`: first step with the GAN loss; `weight`: the 0.8 of the adaptive weight;
    weight 0 turns the GAN off (no discriminator is built)."""

    ndf: int = 64
    n_layers: int = 2
    start: int = 1000
    weight: float = 0.8
    lr: float = 2e-4

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.ndf < 1 or self.start < 0 or self.weight < 0:
            raise ValueError(f"DiscriminatorConfig: need n_layers >= 1, ndf >= 1, start >= 0, weight >= 0, got {self}")


class NLayerDiscriminator(nn.Module):
    """(B, 3, H, W) -> patch logits (B, 1, H', W'). BatchNorm as in pix2pix/VQGAN."""

    def __init__(self, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1  # the last layer keeps the resolution (70x70 PatchGAN)
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # DCGAN init, as pix2pix/VQGAN: N(0, 0.02) convs, N(1, 0.02) norm scales
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float) -> Tensor:
    """lambda of docs/paper.md §3 (a detached scalar): balances the GAN gradient against the
    reconstruction gradient at the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    lam = rec_grad.norm() / (g_grad.norm() + GRAD_EPS)
    return lam.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach() * disc_weight
