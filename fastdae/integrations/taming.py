"""taming-transformers' VectorQuantizer2 over fastdae's fused quantizer: same constructor, forward,
return tuple, state-dict keys and loss conventions, so it swaps into taming/latent-diffusion code.

    from fastdae.integrations.taming import VectorQuantizer2      # instead of taming.modules.vqvae.quantize
    quantize = VectorQuantizer2(n_e, e_dim, beta=0.25)             # legacy=True, as taming's default
    z_q, loss, (perplexity, min_encodings, indices) = quantize(z)  # z (B, e_dim, H, W)
    patch_vq(model)                                                # or swap taming's modules in place

What matches taming's VectorQuantizer2 (tests/integrations/test_taming_compat.py checks it against the real one):
the parameter `embedding.weight` (n_e, e_dim) and its U(-1/n_e, 1/n_e) init, the `used` buffer with
`remap`, forward's outputs (perplexity and min_encodings are None there too; indices (B*H*W,),
(B*H*W, 1) with remap, (B, H, W) with sane_index_shape), the loss value and the gradients to z and
to the codebook under both `legacy` settings, and get_codebook_entry. What differs: z_q is the code
vector exactly (taming returns z + (z_q - z).detach(), which rounds in the last bit); nearest-code
ties and near-ties within fp32 rounding may pick another code (taming scores ||z||^2 + ||e||^2 - 2 z.e,
fastdae ||e||^2 - 2 z.e); unknown_index="random" draws from torch's RNG on z's device, not on the
CPU; legacy=True needs beta > 0 (see _loss); nothing is printed at construction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdae.kernels.vq import vector_quantize


class VectorQuantizer2(nn.Module):
    """VQ-VAE bottleneck with taming-transformers' interface (see the module docstring).

    legacy=True (taming's default) weights the terms the other way round from the VQ-VAE paper:
        loss = ||sg[z_q] - z||^2 + beta ||z_q - sg[z]||^2     (commitment 1, codebook beta)
    legacy=False is the paper's convention (codebook 1, commitment beta), fastdae's vector_quantize.
    remap: a .npy file of the used code indices (U,); forward then returns indices into it, unknown
    codes become `unknown_index` ("random": uniform in [0, re_embed), "extra": U, or an integer)."""

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float,
        remap: str | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if n_e < 1 or e_dim < 1:
            raise ValueError(f"VectorQuantizer2: n_e and e_dim must be >= 1, got {n_e}, {e_dim}")
        if beta < 0 or (legacy and beta == 0):
            raise ValueError(
                f"VectorQuantizer2: beta must be > 0 with legacy=True (>= 0 with legacy=False), got {beta}; with "
                "legacy=True and beta=0 taming's loss would leave the codebook untrained"
            )
        self.n_e, self.e_dim, self.beta, self.legacy, self.impl = n_e, e_dim, beta, legacy, impl
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.remap, self.sane_index_shape = remap, sane_index_shape
        self.re_embed = n_e
        if remap is not None:
            used = torch.as_tensor(np.load(remap))
            if (
                used.dim() != 1
                or used.is_floating_point()
                or used.numel() == 0
                or not (0 <= int(used.min()) and int(used.max()) < n_e)
            ):
                raise ValueError(
                    f"VectorQuantizer2: remap file {remap} must hold a non-empty 1-d array of code "
                    f"indices in [0, n_e={n_e})"
                )
            self.register_buffer("used", used)
            self.re_embed = used.shape[0]
            self.unknown_index = unknown_index
            if unknown_index == "extra":  # one more index, U, stands for every unknown code
                self.unknown_index, self.re_embed = self.re_embed, self.re_embed + 1
            elif unknown_index != "random" and not isinstance(unknown_index, int):
                raise ValueError(
                    f"VectorQuantizer2: unknown_index must be 'random', 'extra' or an int, got {unknown_index!r}"
                )

    def extra_repr(self) -> str:
        return f"n_e={self.n_e}, e_dim={self.e_dim}, beta={self.beta}, legacy={self.legacy}, remap={self.remap!r}"

    # --- remapping (indices into `used` <-> codebook indices) -----------------------------------
    def remap_to_used(self, inds: Tensor) -> Tensor:
        """Codebook indices (any shape) -> positions in `used` (first match); unknowns per unknown_index."""
        used = self.used.to(inds)
        # (n_e,) lookup table: the first position of each code in `used`, or U when it is absent;
        # taming compares every index with every used code instead, an (N, U) matrix
        lut = torch.full((self.n_e,), used.shape[0], dtype=inds.dtype, device=inds.device)
        lut = lut.scatter_reduce(0, used, torch.arange(used.shape[0]).to(inds), "amin")
        new = lut[inds]
        unknown = new == used.shape[0]
        if self.unknown_index == "random":
            fill = torch.randint(0, self.re_embed, inds.shape, device=inds.device, dtype=inds.dtype)
        else:
            fill = torch.full_like(inds, self.unknown_index)
        return torch.where(unknown, fill, new)

    def unmap_to_all(self, inds: Tensor) -> Tensor:
        """Positions in `used` (any shape) -> codebook indices; the "extra" index maps to code used[0]."""
        used = self.used.to(inds)
        if self.re_embed > used.shape[0]:  # taming sets the extra token to position 0
            inds = inds.masked_fill(inds >= used.shape[0], 0)
        return used[inds]

    # --- forward --------------------------------------------------------------------------------
    def _loss(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z_q, indices, loss) of tokens (..., e_dim) in taming's loss convention.

        vector_quantize(z, c, b) gives codebook term A + b * commitment term B (A and B have the same
        value, their gradients go to c and z). legacy: beta A + B = beta * (A + B / beta), beta > 0."""
        codebook = self.embedding.weight.to(tokens.dtype)
        if not self.legacy:
            return vector_quantize(tokens, codebook, self.beta, impl=self.impl)
        z_q, idx, loss = vector_quantize(tokens, codebook, 1.0 / self.beta, impl=self.impl)
        return z_q, idx, self.beta * loss

    def forward(
        self, z: Tensor, temp: float | None = None, rescale_logits: bool = False, return_logits: bool = False
    ) -> tuple[Tensor, Tensor, tuple[None, None, Tensor]]:
        """z (B, e_dim, H, W) -> (z_q (B, e_dim, H, W), loss (), (None, None, indices)); the extra
        arguments exist for GumbelQuantize's interface and must keep their defaults, as in taming."""
        if not (temp is None or temp == 1.0) or rescale_logits or return_logits:
            raise ValueError(
                "VectorQuantizer2: temp, rescale_logits and return_logits exist only for "
                "GumbelQuantize's interface; leave them at their defaults"
            )
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer2: z must be (B, e_dim={self.e_dim}, H, W), got {tuple(z.shape)}")
        tokens = z.permute(0, 2, 3, 1)  # (B, H, W, e_dim)
        z_q, idx, loss = self._loss(tokens)
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # (B, e_dim, H, W)
        idx = idx.reshape(-1)  # (B*H*W,)
        if self.remap is not None:
            idx = self.remap_to_used(idx).reshape(-1, 1)  # taming returns (B*H*W, 1) here
        if self.sane_index_shape:
            idx = idx.reshape(z.shape[0], z.shape[2], z.shape[3])
        return z_q, loss, (None, None, idx)

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, int, int, int] | None) -> Tensor:
        """Code vectors of indices: (N,) -> (N, e_dim), or with shape = (B, H, W, e_dim) the maps
        (B, e_dim, H, W). With remap, indices are positions in `used`."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(-1))
        z_q = F.embedding(indices, self.embedding.weight)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


def _is_taming_vq2(module: nn.Module) -> bool:
    """taming's VectorQuantizer2 (also imported as VectorQuantizer by taming's and latent-diffusion's
    VQModel), recognised by name and attributes so that taming need not be importable here."""
    return (
        type(module).__name__ == "VectorQuantizer2"
        and not isinstance(module, VectorQuantizer2)
        and isinstance(getattr(module, "embedding", None), nn.Embedding)
        and hasattr(module, "legacy")
    )


def _from_taming(old: Any, impl: str) -> VectorQuantizer2:
    """A fastdae VectorQuantizer2 with old's settings, weights, `used` buffer and mode (the remap
    file is not read again: it may be gone since the checkpoint was made)."""
    new = VectorQuantizer2(
        old.n_e, old.e_dim, old.beta, sane_index_shape=old.sane_index_shape, legacy=old.legacy, impl=impl
    )
    new.embedding = old.embedding  # the same Parameter: optimisers holding it keep working
    if old.remap is not None:
        # unknown_index is already resolved by taming ("extra" -> U, with re_embed = U + 1)
        new.remap, new.re_embed, new.unknown_index = old.remap, old.re_embed, old.unknown_index
        new.register_buffer("used", old.used)
    return new.train(old.training)


def patch_vq(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Replaces every taming VectorQuantizer2 inside `model` (in place) by fastdae's, sharing its
    codebook Parameter and `used` buffer; returns model. A model that is itself one is returned
    swapped. Raises if none is found, so a silent no-op cannot pass for a patch."""
    if _is_taming_vq2(model):
        return _from_taming(model, impl)
    targets = [(name, m) for name, m in model.named_modules() if _is_taming_vq2(m)]
    if not targets:
        raise ValueError("patch_vq: no taming VectorQuantizer2 module found in the model")
    for name, old in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _from_taming(old, impl))
    return model
