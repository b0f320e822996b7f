"""VectorQuantizer: the VQ-VAE bottleneck as a drop-in module over fastdae.vector_quantize.

    vq = VectorQuantizer(num_codes=1024, dim=8, ema=True, kmeans_init=True)
    z_q, indices, loss = vq(z)        # z (B, D, H, W) -> indices (B, H, W);  z (B, N, D) -> (B, N)

Codebook learning, one of:
  ema=False  the codebook is a Parameter trained by the loss's codebook term (van den Oord et al. 2017);
  ema=True   the codebook is a buffer, c_k = s_k / n_k with exponential moving averages (decay) of
             the per-code counts n and vector sums s (van den Oord et al. 2017, App. A.1); n is Laplace-
             smoothed, n_k <- (n_k + eps) / (sum n + K eps) * sum n, so no code divides by zero.
             The returned loss still holds the codebook term's value; it carries no gradient there.
Training-mode bookkeeping (nothing changes in eval mode):
  usage      per-code EMA of assignments per step over about `usage_window` steps;
  dead codes a code whose usage falls below `dead_code_threshold` after at least `usage_window`
             steps since its last (re)start is restarted at a random vector of the current batch,
             with its EMA state reset (0 disables restarts);
  stats      usage_stats(): perplexity of the usage distribution, fraction of codes assigned within
             the last `usage_window` steps, count of codes that were not, and restarts so far.
Counts are summed over ranks with torch.distributed (when initialised) before any update, so
codebooks, usage and statistics stay identical across ranks; restart vectors come from rank 0.
All updates are index_add/where over (K,) or (N,) tensors: no N x K one-hot, no host sync.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastdae.kernels.vq import VQOutput, vector_quantize, vq_nearest

KMEANS_SEED_ROUNDS = 32  # k-means++ seeding rounds: bounds the sequential steps for large codebooks


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1e-2,
        kmeans_init: bool = False,
        impl: str = "auto",
        usage_window: int = 100,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"VectorQuantizer: num_codes and dim must be >= 1, got {num_codes}, {dim}")
        if not 0.0 <= decay < 1.0 or usage_window < 1 or dead_code_threshold < 0:
            raise ValueError(
                "VectorQuantizer: need 0 <= decay < 1, usage_window >= 1, dead_code_threshold >= 0; got "
                f"{decay}, {usage_window}, {dead_code_threshold}"
            )
        self.num_codes, self.dim, self.beta, self.ema = num_codes, dim, beta, ema
        self.decay, self.eps, self.impl = decay, eps, impl
        self.dead_code_threshold, self.usage_window = dead_code_threshold, usage_window
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        # taming-transformers' init, U(-1/K, 1/K); k-means or dead-code restarts move codes onto data
        init = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(num_codes))  # one pseudo-observation per code
            self.register_buffer("ema_sum", init.clone())  # (K, D)
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("usage", torch.zeros(num_codes))  # EMA of assignments per step
        self.register_buffer("last_used", torch.full((num_codes,), -usage_window, dtype=torch.long))
        self.register_buffer("last_reset", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))
        self.register_buffer("initted", torch.tensor(not kmeans_init))  # a buffer: resumes skip k-means
        self._initted_seen = False  # host copy of `initted` once True, so steps need no sync

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, ema={self.ema}, "
            f"dead_code_threshold={self.dead_code_threshold}, kmeans_init={self.kmeans_init}"
        )

    # --- forward --------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> VQOutput:
        """z (B, D, H, W) or (B, N, D) -> VQOutput(z_q like z, indices (B, H, W) or (B, N), loss)."""
        if z.dim() not in (3, 4) or (z.shape[1] if z.dim() == 4 else z.shape[-1]) != self.dim:
            raise ValueError(
                f"VectorQuantizer: z must be (B, D={self.dim}, H, W) feature maps or (B, N, D={self.dim}) "
                f"tokens, got shape {tuple(z.shape)}"
            )
        tokens = z.permute(0, 2, 3, 1) if z.dim() == 4 else z  # (B, H, W, D) or (B, N, D)
        if self.training and self.kmeans_init and not self._initted():
            self._kmeans_init(tokens.reshape(-1, self.dim).detach())
        out = vector_quantize(tokens, self.codebook.to(z.dtype), self.beta, impl=self.impl)
        if self.training and z.numel() > 0:
            self._update(tokens.reshape(-1, self.dim).detach(), out.indices.reshape(-1))
        z_q = out.z_q.permute(0, 3, 1, 2) if z.dim() == 4 else out.z_q
        return VQOutput(z_q, out.indices, out.loss)

    def embed(self, indices: Tensor) -> Tensor:
        """Code vectors of indices: (B, H, W) -> (B, D, H, W); (B, N) (or any other rank) -> (..., D)."""
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"VectorQuantizer.embed: indices must be an integer tensor, got {indices.dtype}")
        vectors = F.embedding(indices.long(), self.codebook)  # (..., D)
        return vectors.permute(0, 3, 1, 2) if indices.dim() == 3 else vectors

    # --- training-mode updates ----------------------------------------------------------------
    def _initted(self) -> bool:
        self._initted_seen = self._initted_seen or bool(self.initted)
        return self._initted_seen

    @torch.no_grad()
    def _update(self, flat: Tensor, idx: Tensor) -> None:
        """EMA codebook, usage and dead-code restarts from one batch: flat (N, D), idx (N,)."""
        K = self.num_codes
        self.steps += 1
        # per-code [sum of vectors | count] in one pass: (K, D + 1), summed over ranks
        ones = flat.new_ones(flat.shape[0], 1, dtype=torch.float32)
        src = torch.cat([flat.float(), ones], dim=1) if self.ema else ones
        stats = torch.zeros(K, src.shape[1], device=flat.device).index_add_(0, idx, src)
        if _distributed():
            dist.all_reduce(stats)
        counts = stats[:, -1]  # (K,)
        rho = 1.0 - 1.0 / self.usage_window
        self.usage.mul_(rho).add_(counts, alpha=1.0 - rho)
        self.last_used.copy_(torch.where(counts > 0, self.steps, self.last_used))
        if self.ema:
            self.ema_count.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
            self.ema_sum.mul_(self.decay).add_(stats[:, :-1], alpha=1.0 - self.decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (n + K * self.eps) * n  # Laplace smoothing
            self.codebook.copy_(self.ema_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)

    def _restart_dead_codes(self, flat: Tensor) -> None:
        """Moves codes with usage < threshold (after a full window since their last start) onto
        random vectors of the batch; all K candidates are drawn so no host sync is needed."""
        age = self.steps - self.last_reset
        dead = (self.usage < self.dead_code_threshold) & (age >= self.usage_window)  # (K,)
        candidates = flat[torch.randint(flat.shape[0], (self.num_codes,), device=flat.device)].float()
        if _distributed():
            dist.broadcast(candidates, src=0)  # `dead` is already identical on every rank
        self._reset_codes(dead, candidates)
        self.restarts += dead.sum()

    def _reset_codes(self, mask: Tensor, vectors: Tensor) -> None:
        """Codes where mask (K,) is set become vectors (K, D), with fresh EMA state and usage."""
        self.codebook.copy_(torch.where(mask[:, None], vectors.to(self.codebook.dtype), self.codebook))
        if self.ema:
            self.ema_sum.copy_(torch.where(mask[:, None], vectors, self.ema_sum))
            self.ema_count.masked_fill_(mask, 1.0)
        self.usage.masked_fill_(mask, 0.0)
        self.last_reset.copy_(torch.where(mask, self.steps, self.last_reset))

    @torch.no_grad()
    def _kmeans_init(self, flat: Tensor) -> None:
        """k-means on the first training batch flat (N, D) (rank 0's, under torch.distributed):
        k-means++ seeding in at most KMEANS_SEED_ROUNDS rounds, then kmeans_iters Lloyd steps."""
        N, K = flat.shape[0], self.num_codes
        flat = flat.float()
        centers = self._kmeans_seed(flat)
        for _ in range(self.kmeans_iters):
            idx, _ = vq_nearest(flat, centers, impl=self.impl)
            ones = flat.new_ones(N, 1)
            stats = torch.zeros(K, self.dim + 1, device=flat.device).index_add_(0, idx, torch.cat([flat, ones], 1))
            counts = stats[:, -1:]
            centers = torch.where(counts > 0, stats[:, :-1] / counts.clamp_min(1.0), centers)  # empty: keep
        if _distributed():
            dist.broadcast(centers, src=0)
        self._reset_codes(torch.ones(K, dtype=torch.bool, device=flat.device), centers)
        self.initted.fill_(True)

    def _kmeans_seed(self, flat: Tensor) -> Tensor:
        """(K, D) seeds: each round draws its share of centers with probability proportional to the
        squared distance to the nearest center so far (k-means++ when K <= KMEANS_SEED_ROUNDS)."""
        N, K = flat.shape[0], self.num_codes
        per_round = -(-K // min(K, KMEANS_SEED_ROUNDS))
        centers = flat[torch.randint(N, (1,), device=flat.device)]
        nearest = vq_nearest(flat, centers, impl=self.impl)[1]  # (N,) squared distance to the seeds
        while centers.shape[0] < K:
            m = min(per_round, K - centers.shape[0])
            weights = nearest + 1e-12  # all-zero distances (duplicate data): uniform draw
            new = flat[torch.multinomial(weights, m, replacement=m > N)]
            centers = torch.cat([centers, new])
            nearest = torch.minimum(nearest, vq_nearest(flat, new, impl=self.impl)[1])
        return centers

    # --- statistics ----------------------------------------------------------------------------
    @torch.no_grad()
    def usage_stats(self) -> dict[str, float]:
        """perplexity (of the usage EMA; 1 .. K), used_fraction and dead_codes (assigned / not
        assigned within the last usage_window training steps), restarts (total). One host sync."""
        total = self.usage.sum()
        p = self.usage / total.clamp_min(1e-30)
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        used = (self.steps - self.last_used < self.usage_window).sum()
        perplexity, used, restarts = torch.stack(
            [torch.where(total > 0, entropy.exp(), 0.0), used.float(), self.restarts.float()]
        ).tolist()
        return {
            "perplexity": perplexity,
            "used_fraction": used / self.num_codes,
            "dead_codes": float(self.num_codes - used),
            "restarts": restarts,
        }
