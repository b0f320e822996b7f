"""The smallest flow loss any model can reach on a finite latent set (the exact posterior-mean
velocity of the empirical distribution): E_t E ||x0 - E[x0 | x_t]||^2 / t^2 per dim, with the posterior
over the N training latents. Compares a DiT's training loss with what memorising the set would give.

usage: python results/prior-diagnosis/ideal_loss.py RUN_DIR N [N ...]"""

import sys

import torch
from common import load_run

from fastdae.models.diffusion import LatentScaler

run = sys.argv[1]
cfg, cache, z, labels, _, _ = load_run(run)
x_all = LatentScaler(cache.channel_mean, cache.channel_std).normalize(z).flatten(1).double()  # (N, D)
g = torch.Generator().manual_seed(0)
for n in map(int, sys.argv[2:]):
    xs = x_all[:n]
    losses = []
    for _ in range(8):
        b = torch.randint(0, n, (256,), generator=g)
        t = torch.rand(256, generator=g, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)[:, None]
        x0 = xs[b]
        x_t = (1 - t) * x0 + t * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        d2 = ((x_t[:, None, :] - (1 - t)[:, :, None] * xs[None, :, :]) ** 2).sum(-1)  # (256, n)
        w = torch.softmax(-d2 / (2 * t**2), dim=1)
        mean = w @ xs
        losses.append((((x0 - mean) ** 2).mean(1, keepdim=True) / t**2).mean().item())
    print(f"N={n}: ideal flow loss {sum(losses) / len(losses):.4f} (loss of predicting v = 0: {2.0:.1f})")
