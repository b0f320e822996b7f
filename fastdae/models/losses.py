"""The autoencoder losses of docs/paper.md §3, shared by stage 1 and stage 2:

    L_gen  = l1_weight * |x - x_hat| + chroma_weight * |C (x - x_hat)| + lpips_weight * LPIPS(x, x_hat)
             + aux + lambda * L_G                                                     (L_G after disc.start)
    L_disc = hinge loss of the PatchGAN on (x, sg[x_hat])                       (after disc.start)

aux is the bottleneck term (VQ codebook + commitment, or weighted KL) in stage 1, zero in stage 2.
C projects RGB onto the two opponent-colour axes orthogonal to grey (red-green, yellow-blue): the chroma
term weighs colour errors up, which a small autoencoder otherwise learns last (results/prior-diagnosis:
chroma is a 15x smaller share of the pixel variance than brightness); chroma_weight 0 is VQGAN's loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastdae.models.discriminator import NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss

# rows: orthonormal red-green and yellow-blue axes, both orthogonal to grey (1, 1, 1)
CHROMA_AXES = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]) / torch.tensor([[2.0], [6.0]]).sqrt()


def chroma_l1(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean |error| of (B, 3, H, W) RGB images along the two chroma axes (the L1 of the colour alone)."""
    return torch.einsum("cr,brhw->bchw", CHROMA_AXES.to(x), x - x_hat).abs().mean()


def build_lpips(cfg: Any, device: torch.device) -> nn.Module | None:
    """LPIPS from local weights (cfg.lpips_trunk, cfg.lpips_lin) or random init, else None (the
    trainer says so once per run folder)."""
    if cfg.lpips_weight <= 0 or (cfg.lpips_trunk is None and not cfg.lpips_random_init):
        return None
    from fastdae.nn import LPIPS

    return LPIPS(
        trunk_weights=cfg.lpips_trunk,
        lin_weights=cfg.lpips_lin,
        random_init=cfg.lpips_random_init,
        use_dropout=False,
        check_range=False,
    ).to(device)


class AutoencoderLoss(nn.Module):
    """Reconstruction + perceptual + adversarial losses with the discriminator and its optimizer.

    cfg: an AEStageConfig. `discriminator` is the trainable PatchGAN (None when cfg.disc.weight is 0);
    `disc_train` is the same module wrapped for DDP when distributed (used only for the D step, so
    each DDP forward is followed by exactly one backward)."""

    def __init__(self, cfg: Any, device: torch.device, wrap: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.lpips = build_lpips(cfg, device)
        self.discriminator = (
            NLayerDiscriminator(cfg.disc.ndf, cfg.disc.n_layers).to(device) if cfg.disc.weight > 0 else None
        )
        self.disc_train = (
            wrap(self.discriminator) if wrap is not None and self.discriminator is not None else self.discriminator
        )

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc.start

    def generator_loss(
        self, x: Tensor, x_hat: Tensor, aux: Tensor | float, step: int, last_layer: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, detached terms) for the generator (encoder/decoder) update; x, x_hat (B, 3, H, W)."""
        c = self.cfg
        rec = c.l1_weight * (x - x_hat).abs().mean()
        terms = {"l1": rec.detach()}
        if c.chroma_weight > 0:
            chroma = chroma_l1(x, x_hat)
            rec = rec + c.chroma_weight * chroma
            terms["chroma"] = chroma.detach()
        if self.lpips is not None:
            p = self.lpips(x_hat, x).mean()
            rec = rec + c.lpips_weight * p
            terms["lpips"] = p.detach()
        loss = rec + aux
        if isinstance(aux, Tensor):
            terms["aux"] = aux.detach()
        if self.gan_active(step):
            self.discriminator.requires_grad_(False)  # L_G trains the generator only
            # the same [x; x_hat] batch as the D step, so BatchNorm normalises x_hat with the same
            # statistics D is trained under (D(x_hat) alone would be a different function, which the
            # generator can "fool" while D still separates real from fake perfectly)
            g = hinge_g_loss(self.discriminator(torch.cat([x, x_hat])).chunk(2)[1])
            self.discriminator.requires_grad_(True)
            lam = adaptive_weight(rec, g, last_layer, c.disc.weight)
            loss = loss + lam * g
            terms |= {"g": g.detach(), "lambda": lam}
        return loss, terms

    def discriminator_loss(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """Hinge loss on one forward of [x; sg[x_hat]] (one DDP forward per backward; BatchNorm sees both)."""
        logits = self.disc_train(torch.cat([x, x_hat.detach()]))  # (2B, 1, h, w)
        real, fake = logits.chunk(2)
        return hinge_d_loss(real, fake)
