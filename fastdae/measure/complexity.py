"""Decoder complexity (the paper's C(g)): probes on scale-normalised latents (Lipschitz lower bound,
Jacobian spectral and Frobenius norms), the minimal capacity of decoders fitted to frozen latents,
and the complexity-penalised distance D(P_z, P_x) between latent and data distributions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdae.measure.distribution import (
    extract_features,
    frechet_name,
    frechet_score,
    gaussian_stats,
)
from fastdae.measure.images import (
    Decoder,
    FeatureExtractor,
    _batched,
    _eval_mode,
)


# ---------------------------------------------------------------------------------------------
# Decoder complexity probes (docs/paper.md §1: C(g)), on scale-normalised latents
# ---------------------------------------------------------------------------------------------
def scale_normalize(
    decoder: Decoder, latents: Tensor, mean: Tensor | None = None, std: Tensor | None = None
) -> tuple[Decoder, Tensor]:
    """Per-channel standardised latents z' = (z - mean_c) / std_c and the decoder z' -> D(z' std + mean).

    Rescaling a latent space rescales every Lipschitz or Jacobian norm of its decoder, so probes are
    comparable across encoders only in units of each latent channel's standard deviation (the same
    scaling the DiT prior trains in). mean/std (C,) default to the statistics of `latents` (N, C, h, w);
    pass the cache's stats to match the prior exactly."""
    if latents.dim() != 4:
        raise ValueError(f"scale_normalize: latents must be (N, C, h, w), got {tuple(latents.shape)}")
    if mean is None:
        mean = latents.mean(dim=(0, 2, 3))
    if std is None:
        std = latents.std(dim=(0, 2, 3)).clamp(min=1e-8)
    m, s = mean.view(1, -1, 1, 1).to(latents), std.view(1, -1, 1, 1).to(latents)
    return (lambda z: decoder(z * s + m)), (latents - m) / s


def _check_latents(latents: Tensor, name: str, min_count: int = 1) -> None:
    if latents.dim() < 2 or latents.shape[0] < min_count:
        raise ValueError(f"{name}: latents must be (N, ...) with N >= {min_count}, got {tuple(latents.shape)}")


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)  # (B,)


@torch.no_grad()
def lipschitz_lower_bound(
    decoder: Decoder,
    latents: Tensor,
    pairs: int = 64,
    interpolate: bool = True,
    steps: int = 8,
    batch_size: int = 64,
    seed: int = 0,
) -> float:
    """Empirical Lipschitz lower bound max ||D(z1) - D(z2)|| / ||z1 - z2|| (Euclidean norms).

    `pairs` random pairs (i != j) of real latents; with `interpolate`, each pair's segment is cut
    into `steps` equal pieces z_k = z_i + (k / steps)(z_j - z_i) and the ratio is taken between
    consecutive points. By the triangle inequality the largest piece ratio is >= the endpoint ratio,
    so interpolation can only tighten (raise) the bound; every value is a true lower bound."""
    _check_latents(latents, "lipschitz_lower_bound", 2)
    gen = torch.Generator().manual_seed(seed)
    n = latents.shape[0]
    i = torch.randint(n, (pairs,), generator=gen)
    j = (i + torch.randint(1, n, (pairs,), generator=gen)) % n  # j != i
    z1, z2 = latents[i.to(latents.device)], latents[j.to(latents.device)]  # (P, C, h, w)
    k = steps if interpolate else 1
    t = torch.linspace(0, 1, k + 1, dtype=latents.dtype, device=latents.device).view(1, -1, *[1] * (latents.dim() - 1))
    points = z1.unsqueeze(1) + t * (z2 - z1).unsqueeze(1)  # (P, k + 1, C, h, w)
    with _eval_mode(decoder):
        images = _batched(decoder, points.flatten(0, 1), batch_size)
    images = images.reshape(pairs, k + 1, -1).double()  # (P, k + 1, D_x)
    z = points.flatten(2).double()  # (P, k + 1, D_z)
    ratio = (images[:, 1:] - images[:, :-1]).norm(dim=2) / (z[:, 1:] - z[:, :-1]).norm(dim=2).clamp(min=1e-30)
    return ratio.max().item()


def _probe_batches(
    name: str, decoder: Decoder, latents: Tensor, count: tuple[str, int], batch_size: int, seed: int
) -> Iterator[tuple[Tensor, torch.Generator]]:
    """The Jacobian probes' frame: checked arguments (count: the probe's (name, value) iteration
    count, >= 1), the decoder in eval mode without autograd, and the latents in NCHW-contiguous
    batches (forward-mode group norm needs them), each with the probe's one seeded generator."""
    _check_latents(latents, name)
    if count[1] < 1:
        raise ValueError(f"{name}: {count[0]} must be >= 1, got {count[1]}")
    gen = torch.Generator().manual_seed(seed)
    with _eval_mode(decoder), torch.no_grad():
        for z in latents.contiguous().split(batch_size):
            yield z, gen


def jacobian_spectral_norm(
    decoder: Decoder, latents: Tensor, iters: int = 20, batch_size: int = 64, seed: int = 0
) -> float:
    """Mean over latents of the largest singular value of the decoder's Jacobian at each latent.

    Power iteration on J^T J per latent: v <- J^T (J v) / ||.||, with J v by forward mode
    (torch.func.jvp) and J^T u by reverse mode (torch.func.vjp); no Jacobian is materialised.
    sigma_max ~ ||J v|| after `iters` steps (converges from below at rate (sigma_2 / sigma_1)^2).
    A batch is one call of the decoder: its Jacobian is block diagonal when samples do not interact
    (true in eval mode for conv / group-norm decoders), so all latents of a batch iterate together."""
    sigmas = []
    for z, gen in _probe_batches("jacobian_spectral_norm", decoder, latents, ("iters", iters), batch_size, seed):
        v = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
        v = v / _flat_norm(v).view(-1, *[1] * (z.dim() - 1))
        _, vjp_fn = torch.func.vjp(decoder, z)
        for _ in range(iters):
            _, jv = torch.func.jvp(decoder, (z,), (v,))
            (w,) = vjp_fn(jv)  # J^T J v
            v = w / _flat_norm(w).clamp(min=1e-30).view(-1, *[1] * (z.dim() - 1))
        _, jv = torch.func.jvp(decoder, (z,), (v,))
        sigmas.append(_flat_norm(jv.double()))
    return torch.cat(sigmas).mean().item()


def jacobian_frobenius_hutchinson(
    decoder: Decoder, latents: Tensor, samples: int = 16, batch_size: int = 64, seed: int = 0
) -> tuple[float, float]:
    """Hutchinson estimate of the Jacobian's squared Frobenius norm: ||J||_F^2 = tr(J^T J) = E_v ||J v||^2
    for Rademacher v (entries +-1) in latent space, `samples` jvp's per latent (exact for every v
    when J's columns are orthogonal). Returns (mean over latents of the ||J||_F^2 estimates,
    mean over latents of their square roots)."""
    estimates = []
    batches = _probe_batches("jacobian_frobenius_hutchinson", decoder, latents, ("samples", samples), batch_size, seed)
    for z, gen in batches:
        sq = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        for _ in range(samples):
            v = (torch.randint(0, 2, z.shape, generator=gen) * 2 - 1).to(dtype=z.dtype, device=z.device)
            _, jv = torch.func.jvp(decoder, (z,), (v,))
            sq += _flat_norm(jv.double()).square()
        estimates.append(sq / samples)
    est = torch.cat(estimates)
    return est.mean().item(), est.sqrt().mean().item()


# ---------------------------------------------------------------------------------------------
# Capacity: decoders of increasing width fitted to frozen latents
# ---------------------------------------------------------------------------------------------
@dataclass
class FittedDecoder:
    """One member of a decoder family: its width, parameter count, final reconstruction MSE on the
    (latent, image) pairs it was fitted to, and the fitted module (eval mode)."""

    width: int
    params: int
    error: float
    decoder: nn.Module

    def summary(self) -> dict[str, float]:
        return {"width": self.width, "params": self.params, "error": self.error}


def fit_decoder(
    decoder: nn.Module,
    latents: Tensor,
    images: Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> float:
    """Train `decoder` from frozen latents (N, C, h, w) to images (N, 3, H, W) with Adam on the MSE for
    `steps` seeded minibatches; return the final MSE over all N pairs (eval mode, [-1, 1] units)."""
    if latents.shape[0] != images.shape[0]:
        raise ValueError(
            f"fit_decoder: latents and images must have the same N, got {latents.shape[0]}, {images.shape[0]}"
        )
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    decoder.train()
    for _ in range(steps):
        idx = torch.randint(latents.shape[0], (min(batch_size, latents.shape[0]),), generator=gen).to(latents.device)
        loss = F.mse_loss(decoder(latents[idx]), images[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    decoder.eval()
    with torch.no_grad():
        err = sum(
            F.mse_loss(decoder(z).double(), x.double(), reduction="sum").item()
            for z, x in zip(latents.split(batch_size), images.split(batch_size), strict=True)
        )
    return err / images.numel()


def minimal_capacity(
    make_decoder: Callable[[int], nn.Module],
    latents: Tensor,
    images: Tensor,
    widths: Sequence[int],
    target_error: float,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[int | None, list[FittedDecoder]]:
    """The "minimal capacity" probe: the smallest width w in `widths` whose decoder make_decoder(w),
    trained from the frozen (scale-normalised) latents for the fixed budget of `steps` (fit_decoder),
    reaches reconstruction MSE <= `target_error`; None if none does. Every width is fitted (same
    seed for init and batches), so the second value is the whole error-vs-width curve (the family
    penalised_distance takes). Lower minimal width = latents that are easier to decode."""
    if not widths or sorted(widths) != list(widths):
        raise ValueError(f"minimal_capacity: widths must be a non-empty increasing sequence, got {list(widths)}")
    family = []
    for w in widths:
        with torch.random.fork_rng(devices=[]):  # same init seed per width, caller's RNG untouched
            torch.manual_seed(seed)
            decoder = make_decoder(w).to(latents.device)
        error = fit_decoder(decoder, latents, images, steps, batch_size, lr, seed)
        family.append(FittedDecoder(w, sum(p.numel() for p in decoder.parameters()), error, decoder))
    reached = [f.width for f in family if f.error <= target_error]
    return (reached[0] if reached else None), family


COMPLEXITIES = ("spectral", "lipschitz", "frobenius")


def decoder_complexity(decoder: Decoder, latents: Tensor, measure: str = "spectral", seed: int = 0) -> float:
    """C(g) of docs/paper.md §1 by name: "spectral" (mean Jacobian spectral norm), "lipschitz" (empirical
    Lipschitz lower bound), or "frobenius" (mean Hutchinson estimate of ||J||_F)."""
    if measure == "spectral":
        return jacobian_spectral_norm(decoder, latents, seed=seed)
    if measure == "lipschitz":
        return lipschitz_lower_bound(decoder, latents, seed=seed)
    if measure == "frobenius":
        return jacobian_frobenius_hutchinson(decoder, latents, seed=seed)[1]
    raise ValueError(f"decoder_complexity: measure must be one of {COMPLEXITIES}, got {measure!r}")


def penalised_distance(
    family: Sequence[FittedDecoder],
    latents: Tensor,
    images: Tensor,
    extractor: FeatureExtractor,
    lam: float,
    complexity: str = "spectral",
    probe_latents: int = 64,
    batch_size: int = 128,
    seed: int = 0,
) -> dict:
    """Estimate of the penalised latent/data distance of docs/paper.md §1,

        D(P_z, P_x) = inf_g { d_F(g# P_z, P_x) + lam * C(g) },

    with the infimum over g taken over `family` (decoders of increasing width fitted to these
    frozen latents, from minimal_capacity), and for each g:
      d_F(g# P_z, P_x) = Fréchet distance, in the extractor's feature space (FD-feat with fastdae's
          classifier, FID with the Inception), between g(latents) and `images` (N real images; P_z is
          the empirical latent distribution E# P_x, so g# P_z are the decoded real latents). The
          Fréchet distance stands in for the paper's IPM d_F; it is a *squared* distance.
      C(g) = decoder_complexity(g, first `probe_latents` latents, complexity) on the same latents.
    Latents should be scale-normalised (scale_normalize) so C is comparable across encoders.
    Returns {"value": min score, "width": argmin width, "lam", "complexity", "d_F" name,
    "terms": [{"width", "params", "error", "d_F", "C", "score"} per member]}; any other lambda
    can be re-minimised from "terms" (score = d_F + lam * C)."""
    if not family:
        raise ValueError("penalised_distance: family is empty (fit one with minimal_capacity)")
    real = gaussian_stats(extract_features(extractor, images, batch_size))
    probe = latents[:probe_latents]
    terms = []
    for member in family:
        with torch.no_grad():
            decoded = _batched(member.decoder, latents, batch_size)
        d = frechet_score(extractor, decoded, real, batch_size)
        c = decoder_complexity(member.decoder, probe, complexity, seed)
        terms.append({**member.summary(), "d_F": d, "C": c, "score": d + lam * c})
    best = min(terms, key=lambda t: t["score"])
    return {
        "value": best["score"],
        "width": best["width"],
        "lam": lam,
        "complexity": complexity,
        "d_F": frechet_name(extractor),
        "terms": terms,
    }
