"""Diffusion objectives and samplers for the latent prior, on one Gaussian-path code path.

Both objectives corrupt data along x_t = alpha_t x0 + sigma_t eps, eps ~ N(0, I):

    "ddpm"  (Ho et al. 2020)  t in {0..T-1}, alpha_t^2 = prod_{s<=t} (1 - beta_s), sigma_t^2 = 1 - alpha_t^2;
                              the model predicts eps; linear or cosine (Nichol & Dhariwal 2021) betas.
    "flow"  (rectified flow, Liu et al. 2022)  t in [0, 1], alpha_t = 1 - t, sigma_t = t; the model
                              predicts the velocity v = dx_t/dt = eps - x0 and sees t * T as its timestep.

A prediction is turned into (x0_hat, eps_hat) once; every sampler steps from time t to s < t with them:

    "ddim"   x_s = alpha_s x0_hat + sigma_s eps_hat   (eta = 0). On the flow path this is exactly the
             Euler step x_s = x_t + (s - t) v, and on the DDPM path the Euler step of the probability-flow
             ODE, so "euler" is the same update under its flow name.
    "ddpm"   ancestral: x_s ~ q(x_s | x_t, x0 = x0_hat), the Gaussian posterior of the path (with the
             learned variance when the model outputs 2C channels and the objective is ddpm).

Learned sigma (ddpm, Nichol & Dhariwal): the extra C output channels v in [-1, 1] interpolate the
log variance between the posterior's and the step's; the loss adds the variational bound term
(KL of the posteriors in bits per dim, gradient only into the variance) to the eps MSE, as DiT does.
For the flow objective extra channels are ignored.

Latent scaling is the caller's job (per-channel statistics of the cache): see LatentScaler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

Objective = Literal["ddpm", "flow"]
Schedule = Literal["linear", "cosine"]
TimeSampling = Literal["uniform", "logit_normal"]
TIME_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("ddim", "ddpm", "euler")
CLEAN = -1  # ddpm time index of the data itself (alpha = 1, sigma = 0)


def linear_betas(num_timesteps: int) -> Tensor:
    """DDPM's betas, 1e-4 -> 0.02 at T = 1000, scaled so other T give the same total noise."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """alpha_bar(t) = cos^2((t / T + s) / (1 + s) * pi / 2), betas from its ratios, clipped at max_beta."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


class LatentScaler(nn.Module):
    """Per-channel affine normalisation of latents (B, C, h, w): (x - mean) / std, from data statistics.

    Buffers `mean`, `std` (C,) move with .to() and are saved in state_dict."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.dim() != 1 or mean.shape != std.shape:
            raise ValueError(
                f"LatentScaler: mean and std must both be (C,), got {tuple(mean.shape)}, {tuple(std.shape)}"
            )
        if not (std > 0).all():
            raise ValueError(f"LatentScaler: std must be > 0 in every channel, got {std.tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @classmethod
    def from_data(cls, latents: Tensor, eps: float = 1e-6) -> LatentScaler:
        """Statistics over (B, h, w) of latents (B, C, h, w); std floored at eps (constant channels)."""
        x = latents.double()
        return cls(x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp(min=eps))

    def _affine(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"LatentScaler: expected (B, {self.mean.shape[0]}, h, w) latents, got {tuple(x.shape)}")
        return self.mean.to(x).view(1, -1, 1, 1), self.std.to(x).view(1, -1, 1, 1)

    def normalize(self, x: Tensor) -> Tensor:
        mean, std = self._affine(x)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        mean, std = self._affine(x)
        return x * std + mean


ModelFn = Callable[..., Tensor]  # model(x_t (B, C, h, w), t (B,), y) -> (B, C or 2C, h, w)
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """N(0, I) noise of `shape`. With one generator per sample (a sequence of shape[0] generators on
    `device`), sample i's noise comes from generator i alone: a sample is then the same whichever
    batch it is drawn in (fastdae.sampling seeds one generator per sample index)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"randn: {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])


class Diffusion:
    """Training loss and samplers of one objective; build with make_diffusion()."""

    def __init__(
        self, objective: Objective, schedule: Schedule, num_timesteps: int, time_sampling: TimeSampling = "uniform"
    ) -> None:
        self.objective, self.schedule, self.num_timesteps = objective, schedule, num_timesteps
        self.time_sampling = time_sampling
        if objective == "ddpm":
            betas = linear_betas(num_timesteps) if schedule == "linear" else cosine_betas(num_timesteps)
            # alpha_bar with the clean state prepended, so time index t sits at t + 1 (CLEAN = -1 at 0)
            self._alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])

    # ----- the path --------------------------------------------------------------------------------
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t (float64, t's shape): ddpm t is an index in {CLEAN, 0..T-1}, flow t in [0, 1]."""
        if self.objective == "flow":
            t = t.to(torch.float64)
            return 1 - t, t
        if self._alpha_bar.device != t.device:
            self._alpha_bar = self._alpha_bar.to(t.device)
        alpha_bar = self._alpha_bar[t.long() + 1]
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def model_time(self, t: Tensor) -> Tensor:
        """The timestep the network sees: the ddpm index, or t * T for flow (same embedding range)."""
        return t.float() * (self.num_timesteps if self.objective == "flow" else 1)

    def x0_eps(self, pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the model's prediction (eps for ddpm, v for flow); alpha, sigma (B, 1, 1, 1)."""
        if self.objective == "flow":
            return x_t - sigma * pred, x_t + alpha * pred  # v = eps - x0, x_t = (1 - t) x0 + t eps
        return (x_t - sigma * pred) / alpha, pred

    @staticmethod
    def posterior(a_t: Tensor, s_t: Tensor, a_s: Tensor, s_s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q(x_s | x_t, x0) for s < t on any Gaussian path, as (c_t, c_0, var, step_var) with
        mean = c_t x_t + c_0 x0. With a = alpha_t / alpha_s and step_var = sigma_t^2 - a^2 sigma_s^2
        (the noise added from s to t): c_t = a sigma_s^2 / sigma_t^2, c_0 = alpha_s step_var / sigma_t^2,
        var = step_var sigma_s^2 / sigma_t^2."""
        a = a_t / a_s
        step_var = s_t**2 - a**2 * s_s**2
        return a * s_s**2 / s_t**2, a_s * step_var / s_t**2, step_var * s_s**2 / s_t**2, step_var

    def _step(self, t: Tensor, s: Tensor, B: int) -> tuple[Tensor, ...]:
        """(alpha_t, sigma_t, alpha_s, sigma_s), each (B, 1, 1, 1) float64."""
        return tuple(z.view(B, 1, 1, 1) for z in (*self.alpha_sigma(t), *self.alpha_sigma(s)))

    @staticmethod
    def learned_logvar(v: Tensor, post_var: Tensor, step_var: Tensor) -> Tensor:
        """Nichol & Dhariwal's variance: log var = f log(step_var) + (1 - f) log(post_var), f = (v + 1) / 2."""
        frac = (v.float() + 1) / 2
        return frac * step_var.log().float() + (1 - frac) * post_var.log().float()

    # ----- training --------------------------------------------------------------------------------
    def loss(
        self, model: ModelFn, x0: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Scalar training loss on latents x0 (B, C, h, w): eps MSE (ddpm, + VB term with learned
        sigma) or velocity MSE (flow). generator seeds the timesteps and the noise."""
        if x0.dim() != 4:
            raise ValueError(f"Diffusion.loss: x0 must be (B, C, h, w) latents, got {tuple(x0.shape)}")
        B, C = x0.shape[:2]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.objective == "flow" and self.time_sampling == "logit_normal":  # SD3: t = sigmoid(N(0, 1))
            t = torch.sigmoid(torch.randn(B, generator=generator, device=x0.device, dtype=torch.float64))
        elif self.objective == "flow":
            t = torch.rand(B, generator=generator, device=x0.device, dtype=torch.float64)
        else:
            t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=x0.device)
        alpha, sigma = (z.view(B, 1, 1, 1) for z in self.alpha_sigma(t))
        x_t = alpha.to(x0) * x0 + sigma.to(x0) * noise
        out = model(x_t, self.model_time(t), y)
        if out.shape[1] not in (C, 2 * C) or out.shape[2:] != x0.shape[2:]:
            raise ValueError(f"Diffusion.loss: model output must be (B, {C} or {2 * C}, h, w), got {tuple(out.shape)}")
        pred = out[:, :C]
        target = noise if self.objective == "ddpm" else noise - x0
        per_sample = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))  # (B,)
        if self.objective == "ddpm" and out.shape[1] == 2 * C:
            per_sample = per_sample + self._vb_bits(out[:, C:], pred.detach(), x0, x_t, t)
        return per_sample.mean()

    def _vb_bits(self, v: Tensor, eps: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """(B,) variational-bound term in bits per dim for the learned variance (the mean is frozen):
        KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, and at t = 0 the Gaussian NLL of the
        (continuous) latent x0."""
        B = x0.shape[0]
        a_t, s_t, a_s, s_s = self._step(t, t - 1, B)
        c_t, c_0, var_q, step_var = self.posterior(a_t, s_t, a_s, s_s)
        x0_hat, _ = self.x0_eps(eps, x_t, a_t.to(x0), s_t.to(x0))
        mean_q = c_t.to(x0) * x_t + c_0.to(x0) * x0
        mean_p = c_t.to(x0) * x_t + c_0.to(x0) * x0_hat
        # the posterior variance is 0 into the clean state: t = 1's stands in there, as in ADM
        _, _, var_1, _ = self.posterior(*self._step(t.clamp(min=1), t.clamp(min=1) - 1, B))
        logvar_p = self.learned_logvar(v, torch.where(var_q > 0, var_q, var_1), step_var)
        logvar_q = var_q.clamp(min=1e-20).log().float()
        diff_q, diff_0 = (mean_q - mean_p).float(), (x0 - mean_p).float()
        kl = 0.5 * (-1 + logvar_p - logvar_q + (logvar_q - logvar_p).exp() + diff_q.square() * (-logvar_p).exp())
        nll = 0.5 * (math.log(2 * math.pi) + logvar_p + diff_0.square() * (-logvar_p).exp())
        return torch.where((t == 0).view(B, 1, 1, 1), nll, kl).mean(dim=(1, 2, 3)) / math.log(2.0)

    # ----- sampling --------------------------------------------------------------------------------
    def sample_times(self, steps: int) -> list[float]:
        """steps + 1 descending times from pure noise to the clean state."""
        if self.objective == "flow":
            return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"Diffusion.sample: steps must be in [1, {self.num_timesteps}], got {steps}")
        return torch.linspace(self.num_timesteps - 1, 0, steps).round().long().tolist() + [CLEAN]

    @torch.no_grad()
    def sample(
        self,
        model: ModelFn,
        shape: tuple[int, ...],
        y: Tensor | None = None,
        steps: int = 50,
        sampler: str = "ddim",
        cfg_scale: float = 1.0,
        generator: Generators = None,
        device: torch.device | str | None = None,
        clip_x0: float | None = None,
    ) -> Tensor:
        """Latents x0 (B, C, h, w) float32 from noise in `steps` model evaluations.

        cfg_scale != 1 calls model.forward_with_cfg(x, t, y, cfg_scale) (classifier-free guidance; y
        required). device defaults to the model's. Put a DiT in eval mode first: in training mode its
        label dropout would replace labels with the null class. generator: one torch.Generator for
        the batch, or one per sample (see randn). clip_x0 > 0 clamps every x0 estimate to [-clip_x0,
        clip_x0] and re-derives eps from it (ADM's clip_denoised, in the latents' units): DDPM's cosine
        schedule needs it, its last alpha_bar of 2e-9 amplifies the eps error ~1e4x in x0."""
        if sampler not in SAMPLERS:
            raise ValueError(f"Diffusion.sample: sampler must be one of {SAMPLERS}, got {sampler!r}")
        if steps < 1:
            raise ValueError(f"Diffusion.sample: steps must be >= 1, got {steps}")
        if cfg_scale != 1.0 and y is None:
            raise ValueError("Diffusion.sample: cfg_scale != 1 needs class labels y")
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"Diffusion.sample: clip_x0 must be > 0 or None, got {clip_x0}")
        if device is None:
            device = next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")
        B, C = shape[0], shape[1]
        x = randn(shape, generator, device, torch.float32)
        times = self.sample_times(steps)
        for t, s in zip(times[:-1], times[1:], strict=True):
            t_vec = torch.full((B,), t, device=device, dtype=torch.float64 if self.objective == "flow" else torch.long)
            s_vec = torch.full_like(t_vec, s)  # the next time: sigma_s = 0 only at the clean end
            if cfg_scale == 1.0:
                out = model(x, self.model_time(t_vec), y)
            else:
                out = model.forward_with_cfg(x, self.model_time(t_vec), y, cfg_scale)
            a_t, s_t, a_s, s_s = self._step(t_vec, s_vec, B)
            x0_hat, eps_hat = self.x0_eps(out[:, :C].float(), x, a_t.float(), s_t.float())
            if clip_x0 is not None:
                x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
                eps_hat = (x - a_t.float() * x0_hat) / s_t.float()
            if sampler == "ddpm" and s != (CLEAN if self.objective == "ddpm" else 0.0):
                c_t, c_0, var, step_var = self.posterior(a_t, s_t, a_s, s_s)
                if self.objective == "ddpm" and out.shape[1] == 2 * C:
                    logvar = self.learned_logvar(out[:, C:], var, step_var)
                else:
                    logvar = var.log().float()
                noise = randn(tuple(x.shape), generator, device, x.dtype)
                x = c_t.float() * x + c_0.float() * x0_hat + (0.5 * logvar).exp() * noise
            else:  # ddim / euler, and every sampler's last step into the clean state (x = x0_hat)
                x = a_s.float() * x0_hat + s_s.float() * eps_hat
        return x


def make_diffusion(
    objective: Objective = "ddpm",
    schedule: Schedule = "linear",
    num_timesteps: int = 1000,
    time_sampling: TimeSampling = "uniform",
) -> Diffusion:
    """The prior's diffusion: objective "ddpm" (eps prediction) or "flow" (rectified flow, velocity).

    schedule ("linear" | "cosine") sets DDPM's betas; the flow path is fixed (only "linear" fits it).
    num_timesteps: DDPM's chain length; for flow the scale of the timestep fed to the network.
    time_sampling: the training times of flow, "uniform" on [0, 1] or "logit_normal" (t = sigmoid(n),
    n ~ N(0, 1): Esser et al. 2024, SD3), which trains the middle of the path, where a sample's layout
    is decided, more often than its ends; ddpm samples its indices uniformly."""
    if objective not in ("ddpm", "flow"):
        raise ValueError(f"make_diffusion: objective must be 'ddpm' or 'flow', got {objective!r}")
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"make_diffusion: schedule must be 'linear' or 'cosine', got {schedule!r}")
    if objective == "flow" and schedule != "linear":
        raise ValueError("make_diffusion: the flow objective has one (linear) path; schedule must be 'linear'")
    if num_timesteps < 1:
        raise ValueError(f"make_diffusion: num_timesteps must be >= 1, got {num_timesteps}")
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"make_diffusion: time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
    if objective == "ddpm" and time_sampling != "uniform":
        raise ValueError(
            "make_diffusion: time_sampling 'logit_normal' is for the flow objective; ddpm samples its indices uniformly"
        )
    return Diffusion(objective, schedule, num_timesteps, time_sampling)
