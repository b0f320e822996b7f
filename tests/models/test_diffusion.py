"""Diffusion: schedules, the loss, and every sampler against the exact denoiser of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from fastdae.models.diffusion import CLEAN, Diffusion, LatentScaler, cosine_betas, linear_betas, make_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedules():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    cos = cosine_betas(1000)
    alpha_bar = torch.cumprod(1 - cos, 0)
    assert (cos > 0).all() and (cos <= 0.999).all() and (alpha_bar[1:] < alpha_bar[:-1]).all()
    # cosine: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) * pi / 2)

    def f(t: float) -> float:
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    assert alpha_bar[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
    d = make_diffusion("ddpm", "cosine", 1000)
    a, s = d.alpha_sigma(torch.tensor([CLEAN, 499]))
    assert a[0].item() == 1.0 and s[0].item() == 0.0 and a[1].item() ** 2 == pytest.approx(alpha_bar[499].item())


def gaussian_oracle(diffusion: Diffusion, mu: float, std: float):
    """The exact model for data x0 ~ N(mu, std^2 I): E[x0 | x_t] = mu + a std^2 / (a^2 std^2 + sigma^2) (x_t - a mu),
    returned as the objective's prediction (eps for ddpm, v = eps - x0 for flow)."""

    def model(x_t, model_time, y=None):
        t = (
            model_time.double() / diffusion.num_timesteps
            if diffusion.objective == "flow"
            else model_time.round().long()
        )
        a, s = (z.view(-1, 1, 1, 1).float() for z in diffusion.alpha_sigma(t))
        x0 = mu + a * std**2 / (a**2 * std**2 + s**2) * (x_t - a * mu)
        eps = (x_t - a * x0) / s
        return eps if diffusion.objective == "ddpm" else eps - x0

    return model


@pytest.mark.parametrize(
    "objective, schedule, sampler, steps",
    [
        ("ddpm", "linear", "ddim", 200),
        ("ddpm", "cosine", "ddim", 200),
        ("ddpm", "linear", "ddpm", 1000),
        ("ddpm", "cosine", "euler", 200),
        ("flow", "linear", "euler", 200),
        ("flow", "linear", "ddpm", 1000),
    ],
)
def test_samplers_recover_gaussian_data(objective, schedule, sampler, steps):
    diffusion = make_diffusion(objective, schedule)
    mu, std = 0.5, 0.7
    samples = diffusion.sample(
        gaussian_oracle(diffusion, mu, std),
        (2000, 2, 2, 2),
        steps=steps,
        sampler=sampler,
        generator=torch.Generator().manual_seed(0),
    )
    # 16000 values: sampling error ~0.5%; the rest is the samplers' discretisation error (-> 0 with steps)
    assert samples.mean().item() == pytest.approx(mu, abs=0.02)
    assert samples.std().item() == pytest.approx(std, rel=0.02)


@pytest.mark.parametrize("objective, sampler", [("ddpm", "ddpm"), ("flow", "euler")])
def test_one_generator_per_sample_makes_a_sample_independent_of_its_batch(objective, sampler):
    """ddpm draws fresh noise every step, euler only at the start: either way, sample i comes from
    generator i alone (fastdae.sampling seeds one per sample index)."""
    diffusion = make_diffusion(objective)
    model = gaussian_oracle(diffusion, 0.5, 0.7)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = diffusion.sample(model, (3, 2, 2, 2), steps=5, sampler=sampler, generator=gens([10, 11, 12]))
    alone = diffusion.sample(model, (1, 2, 2, 2), steps=5, sampler=sampler, generator=gens([11]))
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="one per sample"):
        diffusion.sample(model, (3, 2, 2, 2), steps=5, sampler=sampler, generator=gens([1, 2]))


def test_loss_is_zero_mse_for_the_exact_prediction_and_vb_vanishes_at_the_true_variance():
    """With the true noise as prediction the MSE is 0; with v = -1 (posterior variance) the KL is 0 for t > 0."""
    d = make_diffusion("ddpm", num_timesteps=100)
    x0 = torch.randn(6, 3, 4, 4)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(3)

    noise = torch.randn(x0.shape, generator=gen())  # the loss draws its noise first from the same generator
    t_seen = []

    def perfect(x_t, t, y=None):
        t_seen.append(t)
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    loss = d.loss(perfect, x0, generator=gen())
    t = t_seen[0].long()
    nll_t0 = (t == 0).any().item()
    assert not nll_t0, "pick a seed without t = 0 (where the term is an NLL, not a KL)"
    assert abs(loss.item()) < 1e-5

    flow = make_diffusion("flow")
    assert flow.loss(lambda x_t, t, y=None: noise - x0, x0, generator=gen()).item() < 1e-10


@pytest.mark.parametrize("time_sampling, inner_share", [("uniform", 0.5), ("logit_normal", 0.7280)])
def test_flow_training_times_follow_the_time_sampling(time_sampling, inner_share):
    """The times the flow loss feeds the model: uniform on [0, 1], or sigmoid(N(0, 1)), whose share in
    [0.25, 0.75] is P(|n| < log 3) = 0.728; the path at those times is x_t = (1 - t) x0 + t eps."""
    d = make_diffusion("flow", time_sampling=time_sampling)
    x0 = torch.randn(20000, 1, 1, 1)
    seen = {}

    def record(x_t, t, y=None):
        seen["x_t"], seen["t"] = x_t, t / d.num_timesteps
        return torch.zeros_like(x_t)

    gen = torch.Generator().manual_seed(0)
    d.loss(record, x0, generator=gen)
    t = seen["t"].double()
    assert 0 < t.min() and t.max() < 1
    share = ((t > 0.25) & (t < 0.75)).double().mean().item()
    assert abs(share - inner_share) < 0.015, share  # 4 standard errors of 20,000 draws
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)  # drawn first, as in the loss
    torch.testing.assert_close(seen["x_t"], ((1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise).float())


def test_loss_shapes_and_errors():
    d = make_diffusion()
    x0 = torch.randn(2, 4, 8, 8)
    loss = d.loss(lambda x, t, y=None: torch.zeros(2, 8, 8, 8), x0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"\(B, 4 or 8, h, w\)"):
        d.loss(lambda x, t, y=None: torch.zeros(2, 3, 8, 8), x0)
    with pytest.raises(ValueError, match="objective"):
        make_diffusion("edm")
    with pytest.raises(ValueError, match="schedule must be 'linear'"):
        make_diffusion("flow", "cosine")
    with pytest.raises(ValueError, match="time_sampling must be one of"):
        make_diffusion("flow", time_sampling="beta")
    with pytest.raises(ValueError, match="is for the flow objective"):
        make_diffusion("ddpm", time_sampling="logit_normal")
    with pytest.raises(ValueError, match="sampler must be one of"):
        d.sample(lambda x, t, y=None: x, (1, 4, 2, 2), sampler="heun")
    with pytest.raises(ValueError, match="needs class labels"):
        d.sample(lambda x, t, y=None: x, (1, 4, 2, 2), cfg_scale=2.0)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        d.sample(lambda x, t, y=None: x, (1, 4, 2, 2), steps=2000)


@pytest.mark.parametrize("shape", [(64, 4, 8, 8), (32, 16, 4, 4)])
def test_latent_scaler_from_data(shape):
    C = shape[1]
    latents = torch.randn(shape) * torch.linspace(0.1, 5, C).view(1, C, 1, 1) + torch.arange(C).view(1, C, 1, 1)
    scaler = LatentScaler.from_data(latents)
    z = scaler.normalize(latents)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(C), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(C), rtol=0, atol=1e-5)
    torch.testing.assert_close(scaler.denormalize(z), latents, rtol=1e-5, atol=1e-5)
    assert set(scaler.state_dict()) == {"mean", "std"}
    with pytest.raises(ValueError, match=rf"\(B, {C}, h, w\)"):
        scaler.normalize(torch.zeros(2, C + 1, 4, 4))


def test_latent_scaler_errors():
    with pytest.raises(ValueError, match="std must be > 0"):
        LatentScaler(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"both be \(C,\)"):
        LatentScaler(torch.zeros(3), torch.ones(4))
