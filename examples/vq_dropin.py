"""Replace a VQGAN/taming-style vector quantizer with fastdae.nn.VectorQuantizer.

    python examples/vq_dropin.py

`quantize = VectorQuantizer(n_e, e_dim, beta)` (taming-transformers) becomes
`quantize = fastdae.nn.VectorQuantizer(num_codes, dim, beta=beta)`; the codebook is `.codebook`
(K, D) instead of `.embedding.weight`, and the output is a named tuple (z_q, indices, loss). The
nearest-code search runs fused (Triton on CUDA, C++ on CPU) without the (N, K) distance matrix.
"""
import torch
from torch import nn

from fastdae.nn import VectorQuantizer


class TamingQuantizer(nn.Module):
    """The usual VQ-VAE bottleneck, written as taming-transformers does (legacy=False)."""

    def __init__(self, n_e: int, e_dim: int, beta: float) -> None:
        super().__init__()
        self.beta, self.embedding = beta, nn.Embedding(n_e, e_dim)

    def forward(self, z: torch.Tensor):
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*H*W, D)
        idx = torch.cdist(flat, self.embedding.weight).argmin(dim=1)  # the (N, K) matrix fastdae avoids
        z_q = self.embedding(idx).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        loss = ((z_q - z.detach()) ** 2).mean() + self.beta * ((z_q.detach() - z) ** 2).mean()
        z_q = z + (z_q - z).detach()  # straight-through
        return z_q, loss, idx.view(z.shape[0], z.shape[2], z.shape[3])


def main() -> None:
    torch.manual_seed(0)
    theirs = TamingQuantizer(n_e=64, e_dim=8, beta=0.25)
    ours = VectorQuantizer(num_codes=64, dim=8, beta=0.25)  # the one-line swap
    with torch.no_grad():
        ours.codebook.copy_(theirs.embedding.weight)  # same codebook, to compare the two

    z = torch.randn(4, 8, 16, 16)  # (B, D, H, W) encoder output
    z_a, z_b = z.clone().requires_grad_(), z.clone().requires_grad_()
    zq_a, loss_a, idx_a = theirs(z_a)
    out = ours(z_b)
    (zq_a.square().mean() + loss_a).backward()
    (out.z_q.square().mean() + out.loss).backward()

    print(f"indices equal: {torch.equal(out.indices, idx_a)}; loss {out.loss.item():.6f} vs {loss_a.item():.6f}")
    print(f"max |z_q diff| {(out.z_q - zq_a).abs().max().item():.1e}; "
          f"max |dz diff| {(z_b.grad - z_a.grad).abs().max().item():.1e}; "
          f"max |d codebook diff| {(ours.codebook.grad - theirs.embedding.weight.grad).abs().max().item():.1e}")
    assert torch.equal(out.indices, idx_a)
    assert torch.allclose(out.loss, loss_a, rtol=1e-5) and torch.allclose(out.z_q, zq_a, atol=1e-6)
    assert torch.allclose(z_b.grad, z_a.grad, atol=1e-6)
    assert torch.allclose(ours.codebook.grad, theirs.embedding.weight.grad, atol=1e-6)
    print("ok: same codes, loss and gradients as the taming-style quantizer")


if __name__ == "__main__":
    main()
