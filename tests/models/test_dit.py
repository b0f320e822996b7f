"""DiT: shapes, the size registry, adaLN-Zero at init, guidance, and a tiny model overfitting latents."""

from __future__ import annotations

import pytest
import torch

from fastdae.models.diffusion import make_diffusion
from fastdae.models.dit import DiT, DiT_models, sincos_2d

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> DiT:
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4)
    return DiT(**{**args, **kw})


def randomize(model: DiT, std: float = 0.1) -> DiT:
    """Perturb every trainable weight, so the zero-initialised paths carry signal."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    return model


@pytest.mark.parametrize(
    "name, latent, num_classes, learn_sigma",
    [("DiT-T/1", (16, 4, 4), 0, False), ("DiT-T/2", (4, 8, 8), 10, True), ("DiT-T/4", (3, 8, 8), 2, False)],
)
def test_forward_shapes(name, latent, num_classes, learn_sigma):
    C, h, _ = latent
    model = DiT_models[name](input_size=h, in_channels=C, num_classes=num_classes, learn_sigma=learn_sigma)
    x, t = torch.randn(3, *latent), torch.tensor([0, 500, 999])
    y = torch.randint(0, num_classes, (3,)) if num_classes else None
    out = randomize(model)(x, t, y)
    assert out.shape == (3, 2 * C if learn_sigma else C, h, h)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, millions", [("DiT-S/2", 33.0), ("DiT-B/2", 130.5), ("DiT-L/2", 458.1), ("DiT-XL/2", 675.1)]
)
def test_registry_matches_dit_paper_sizes(name, millions):
    """Parameter counts of DiT (Peebles & Xie, Table 1) at 32x32x4 latents, 1000 classes, learned sigma."""
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)
    assert {f"DiT-{s}/{p}" for s in ("T", "S", "B", "L", "XL") for p in (1, 2, 4)} == set(DiT_models)


def test_adaln_zero_blocks_are_identity_at_init():
    model = tiny(num_classes=5)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    for block in model.blocks:
        torch.testing.assert_close(block(x, c), x, rtol=0, atol=0)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 4]))
    assert (out == 0).all(), "zero final layer: the first prediction is 0"
    randomize(model)
    assert not torch.allclose(model.blocks[0](x, c), x), "the gates open once the modulation is trained"


def test_pos_embed_is_fixed_sincos():
    model = tiny()
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(64, 4).float())


def test_unpatchify_inverts_patchify():
    """A token holding patch (i, j)'s pixels in (p, q, c) order lands back at rows i*p.., cols j*p.."""
    model = tiny(patch_size=2)
    x = torch.randn(2, 4, 8, 8)
    tokens = x.reshape(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 2 * 2 * 4)  # (B, T, p*p*C)
    torch.testing.assert_close(model.unpatchify(tokens), x, rtol=0, atol=0)


def test_cfg_scale_one_equals_conditional_and_guidance_uses_null_class():
    model = randomize(tiny(num_classes=5, learn_sigma=True)).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 400, 900]), torch.tensor([0, 2, 4])
    cond = model(x, t, y)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond, rtol=1e-5, atol=1e-5)
    guided = model.forward_with_cfg(x, t, y, 4.0)
    uncond = model(x, t, torch.full_like(y, 5))
    torch.testing.assert_close(guided[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:], rtol=1e-5, atol=1e-5)  # variance stays conditional


def test_label_dropout_only_in_training():
    model = tiny(num_classes=3, class_dropout_prob=1.0)
    labels = torch.tensor([0, 1, 2])
    emb = model.y_embedder
    torch.testing.assert_close(emb.train()(labels), emb.embedding_table(torch.full_like(labels, 3)))
    torch.testing.assert_close(emb.eval()(labels), emb.embedding_table(labels))


def test_input_validation():
    model = tiny(num_classes=3)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"x must be \(B, 4, 8, 8\)"):
        model(torch.randn(2, 4, 6, 6), t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="y must be integer labels"):
        model(x, t, None)
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        tiny().forward_with_cfg(x, t, torch.tensor([0, 1]), 2.0)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        tiny(input_size=9)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_tiny_dit_overfits_a_handful_of_latents(objective):
    """Same timesteps and noise every step (a re-seeded generator): the loss must fall >= 10x."""
    model = tiny(num_classes=4, class_dropout_prob=0.0, learn_sigma=objective == "ddpm")
    diffusion = make_diffusion(objective)
    x0, y = torch.randn(4, 4, 8, 8), torch.arange(4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss = diffusion.loss(model, x0, y, generator=torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses[::10]


@pytest.mark.parametrize(
    "objective, sampler", [("ddpm", "ddim"), ("ddpm", "ddpm"), ("flow", "euler"), ("flow", "ddpm")]
)
def test_sampling_shapes_finite_and_cfg_one_is_unguided(objective, sampler):
    model = randomize(tiny(num_classes=3, learn_sigma=True)).eval()
    diffusion = make_diffusion(objective)
    y = torch.tensor([0, 1, 2])

    def run(cfg: float) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        return diffusion.sample(model, (3, 4, 8, 8), y=y, steps=4, sampler=sampler, cfg_scale=cfg, generator=gen)

    out = run(1.0)
    assert out.shape == (3, 4, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, run(1.0), rtol=0, atol=0)  # the generator makes it reproducible
    assert torch.isfinite(run(3.0)).all() and not torch.allclose(run(3.0), out)


@pytest.mark.parametrize("objective, sampler", [("flow", "euler"), ("flow", "ddpm")])
def test_trained_dit_samples_the_pattern_of_the_asked_class(objective, sampler):
    """End to end through loss, label embedding, sampler direction and guidance: latents = a fixed
    pattern per class + 0.1 noise; after a short training every sample (with and without CFG) must lie
    nearest its own class's pattern. A sign error in the velocity, a reversed time grid, labels that
    never reach the model or a swapped CFG formula all put samples at chance (1/4) or off the patterns.
    (results/prior-diagnosis: the same check at the default prior's size.)"""
    diffusion = make_diffusion(objective)
    model, patterns = _train_on_patterns(diffusion, steps=300)
    y = torch.arange(32) % 4
    for cfg_scale in (1.0, 3.0):
        x = diffusion.sample(
            model,
            (32, 4, 4, 4),
            y=y,
            steps=20,
            sampler=sampler,
            cfg_scale=cfg_scale,
            generator=torch.Generator().manual_seed(1),
        )
        hits, rms = _pattern_fit(x, y, patterns)
        assert hits.all(), (cfg_scale, hits)
        # near the pattern (N(0, 1) entries), not merely on its side; guidance overshoots a little
        assert rms < (0.35 if cfg_scale == 1.0 else 0.8), (cfg_scale, rms)


def test_ddpm_cosine_samples_need_the_x0_clip():
    """DDPM with the cosine schedule: its last alpha_bar is 2e-9, so the first sampling step amplifies the
    eps error ~1e4x in x0 and unclipped samples explode (results/prior-diagnosis, hypothesis 12); with
    clip_x0 the same trained DiT samples its class's pattern."""
    diffusion = make_diffusion("ddpm", "cosine")
    model, patterns = _train_on_patterns(diffusion, steps=1500)
    y = torch.arange(32) % 4
    runs = {
        clip: diffusion.sample(
            model,
            (32, 4, 4, 4),
            y=y,
            steps=20,
            sampler="ddpm",
            clip_x0=clip,
            generator=torch.Generator().manual_seed(1),
        )
        for clip in (None, 4.0)
    }
    assert _pattern_fit(runs[None], y, patterns)[1] > 100  # exploded
    hits, rms = _pattern_fit(runs[4.0], y, patterns)
    assert hits.all() and rms < 0.35, (hits, rms)
    with pytest.raises(ValueError, match="clip_x0"):
        diffusion.sample(model, (2, 4, 4, 4), y=y[:2], steps=2, clip_x0=0.0)


def _train_on_patterns(diffusion, steps: int) -> tuple[DiT, torch.Tensor]:
    """A small DiT trained on latents = a fixed N(0, 1) pattern per class (4 classes) + 0.1 noise."""
    torch.manual_seed(0)
    patterns = torch.randn(4, 4, 4, 4)
    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        y = torch.randint(0, 4, (32,), generator=g)
        x0 = patterns[y] + 0.1 * torch.randn(32, 4, 4, 4, generator=g)
        loss = diffusion.loss(model, x0, y, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), patterns


def _pattern_fit(x: torch.Tensor, y: torch.Tensor, patterns: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(whether each sample lies nearest its class's pattern, rms distance to that pattern per entry)."""
    dist = torch.cdist(x.flatten(1), patterns.flatten(1))  # (B, 4)
    return dist.argmin(1) == y, (dist[torch.arange(len(y)), y] ** 2 / x[0].numel()).mean().sqrt().item()
