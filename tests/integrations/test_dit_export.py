"""fastdae.integrations.save_dit / load_dit: the DiT prior as model.safetensors + config.json."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdae.integrations import load_dit, load_pretrained, save_dit
from fastdae.integrations.dit_export import DiTSpec
from fastdae.models.diffusion import LatentScaler, make_diffusion
from fastdae.models.dit import DiT, DiT_models

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_like(dit: DiT) -> DiT:
    """Perturb every weight: a fresh DiT's zero-initialised output layers would hide a wrong load."""
    with torch.no_grad():
        for p in dit.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return dit.eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(model="DiT-T/2", num_classes=5, learn_sigma=False),
        dict(model="DiT-T/4", num_classes=0, learn_sigma=True),  # unconditional, variance channels
        dict(model="DiT-T/1", num_classes=3, learn_sigma=False, mlp_ratio=2.0, class_dropout_prob=0.25),
    ],
)
def test_round_trip_gives_the_same_model(tmp_path, kwargs):
    kwargs = dict(kwargs)
    dit = trained_like(DiT_models[kwargs.pop("model")](input_size=8, in_channels=4, **kwargs))
    save_dit(dit, tmp_path / "dit")
    prior = load_dit(tmp_path / "dit")
    assert prior.diffusion is None and prior.scaler is None and not prior.dit.training
    assert DiTSpec.of(prior.dit) == DiTSpec.of(dit)
    assert not prior.dit.pos_embed.requires_grad  # still the frozen sin-cos table
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 10.0, 999.0])
    y = torch.tensor([0, 1, 2]) if dit.num_classes else None
    torch.testing.assert_close(prior.dit(x, t, y), dit(x, t, y), rtol=0, atol=0)


def test_diffusion_and_latent_stats_travel_with_it(tmp_path):
    dit = trained_like(DiT_models["DiT-T/2"](input_size=4, in_channels=2, num_classes=2))
    scaler = LatentScaler(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25]))
    save_dit(dit, tmp_path / "dit", make_diffusion("ddpm", "cosine", 100), scaler)
    prior = load_dit(tmp_path / "dit")
    d = prior.diffusion
    assert (d.objective, d.schedule, d.num_timesteps) == ("ddpm", "cosine", 100)
    assert torch.equal(prior.scaler.mean, scaler.mean) and torch.equal(prior.scaler.std, scaler.std)
    y = torch.tensor([0, 1])
    samples = [
        p.diffusion.sample(p.dit, (2, 2, 4, 4), y=y, steps=3, generator=torch.Generator().manual_seed(0))
        for p in (prior, type(prior)(dit, make_diffusion("ddpm", "cosine", 100), scaler))
    ]
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=0)


def test_mismatches_are_named(tmp_path):
    dit = DiT_models["DiT-T/2"](input_size=8, in_channels=4, num_classes=5)
    path = save_dit(dit, tmp_path / "dit")
    weights = load_file(path / "model.safetensors")
    weights["y_embedder.embedding_table.weight"] = torch.zeros(7, 128)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"y_embedder.embedding_table.weight.*\(7, 128\).*\(6, 128\)"):
        load_dit(path)
    meta = json.loads((path / "config.json").read_text())
    meta["kind"] = "decoder"
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a DiT"):
        load_dit(path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dit(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="DiT"):
        save_dit(torch.nn.Linear(2, 2), tmp_path / "x")


def test_the_autoencoder_loader_points_a_dit_export_elsewhere(tmp_path):
    save_dit(DiT_models["DiT-T/2"](input_size=4, in_channels=4), tmp_path / "dit")
    with pytest.raises(ValueError, match="kind"):
        load_pretrained(tmp_path / "dit")
