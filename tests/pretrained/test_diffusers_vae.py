"""fastdae.pretrained.diffusers_vae against the real diffusers package: a small randomly initialised
AutoencoderKL / VQModel saved to a temp folder is the frozen stage 1; its latents (directly and through
LatentCache) decode with our DiffusersDecoder exactly as the exported folder's `from_pretrained(...).decode`
decodes them. Nothing is downloaded."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdae.cache import LatentCache
from fastdae.data import ArrayDataset
from fastdae.pretrained.diffusers_vae import (
    DiffusersDecoder,
    DiffusersStage1,
    export_diffusers,
    latent_shape,
    load_stage1,
    read_config,
)

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")

TINY = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)
ATOL = 1e-5  # two float32 runs of the same decoder weights on the same input, different module objects


def images(n: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (B, 3, H, W)


def save_kl(folder, **overrides) -> diffusers.AutoencoderKL:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**{**TINY, **overrides}).eval()
    vae.save_pretrained(folder)
    return vae


def save_vq(folder, **overrides) -> diffusers.VQModel:
    """A VQModel whose codes lie on its encoder's outputs (as after training; diffusers' init is
    U(-1/K, 1/K), where near-ties between codes would make any two nearest-code searches disagree)."""
    torch.manual_seed(0)
    vae = diffusers.VQModel(**{**TINY, "num_vq_embeddings": 32, **overrides}).eval()
    with torch.no_grad():
        h = vae.encode(images(8, seed=1)).latents  # (8, D, 8, 8)
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        vae.quantize.embedding.weight.copy_(flat[torch.randperm(len(flat))[:32]])
    vae.save_pretrained(folder)
    return vae


def assert_decoders_differ(ours: DiffusersDecoder, vae: torch.nn.Module) -> None:
    """A fresh decoder is not the source's, so the export really carries the new weights."""
    assert not torch.equal(ours.decoder.conv_out.weight, vae.decoder.conv_out.weight)


KL_VARIANTS = {
    "default": {},
    "no_quant_convs": dict(use_quant_conv=False, use_post_quant_conv=False),
    "no_mid_attention": dict(mid_block_add_attention=False),
}


@pytest.mark.parametrize("variant", KL_VARIANTS)
def test_kl_encode_decode_export(tmp_path, variant):
    vae = save_kl(tmp_path / "src", **KL_VARIANTS[variant])
    stage1 = load_stage1(tmp_path / "src")
    assert (stage1.kind, stage1.latent_channels, stage1.downsample) == ("kl", 4, 2)
    assert latent_shape(tmp_path / "src") == (4, 2)  # from config.json alone
    assert stage1.scaling_factor == pytest.approx(vae.config.scaling_factor)
    x = images()
    fields, stats = stage1.encode_fields(x)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    assert sorted(fields) == ["logvar", "mean"] and fields["mean"].shape == (3, 4, 8, 8)
    torch.testing.assert_close(fields["mean"], posterior.mean, rtol=0, atol=ATOL)
    torch.testing.assert_close(fields["logvar"], posterior.logvar, rtol=0, atol=ATOL)
    torch.testing.assert_close(stats, fields["mean"], rtol=0, atol=0)
    z = stage1.latent(fields)  # posterior="mean": the mean even with sample=True
    torch.testing.assert_close(z, posterior.mode(), rtol=0, atol=ATOL)

    decoder = DiffusersDecoder.from_source(tmp_path / "src").eval()
    assert_decoders_differ(decoder, vae)
    assert (decoder.post_quant_conv is None) == (variant == "no_quant_convs")
    with torch.no_grad():
        x_hat = decoder(z)
    assert x_hat.shape == x.shape
    out = export_diffusers(decoder, tmp_path / "src", tmp_path / "out")
    loaded = diffusers.AutoencoderKL.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z).sample, x_hat, rtol=0, atol=ATOL)
        # the encoder side is the source's: same latents from the exported folder
        torch.testing.assert_close(loaded.encode(x).latent_dist.mean, posterior.mean, rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["block_out_channels"] == [8, 16]
    assert load_stage1(out).sha256 == stage1.sha256  # same encoder, so a cache of it stays valid


def test_kl_posterior_sample_matches_diffusers_draw(tmp_path):
    vae = save_kl(tmp_path / "src")
    stage1 = load_stage1(tmp_path / "src", posterior="sample")
    x = images()
    fields, _ = stage1.encode_fields(x)
    assert all(t.is_contiguous() for t in fields.values())  # randn_like draws in memory order
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    torch.manual_seed(7)
    ours = stage1.latent(fields)
    torch.manual_seed(7)
    theirs = posterior.sample()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    assert not torch.allclose(stage1.latent(fields), ours)  # a fresh draw per call
    torch.testing.assert_close(stage1.latent(fields, sample=False), posterior.mean, rtol=0, atol=ATOL)


VQ_VARIANTS = {
    "default": {},
    "embed_dim_3": dict(vq_embed_dim=3),
    "spatial_norm": dict(norm_type="spatial", block_out_channels=(32, 32)),
}  # SpatialNorm: 32 groups


@pytest.mark.parametrize("variant", VQ_VARIANTS)
def test_vq_encode_decode_export(tmp_path, variant):
    vae = save_vq(tmp_path / "src", **VQ_VARIANTS[variant])
    stage1 = load_stage1(tmp_path / "src")
    D = vae.quantize.embedding.weight.shape[1]
    assert (stage1.kind, stage1.latent_channels, stage1.num_codes, stage1.downsample) == ("vq", D, 32, 2)
    assert latent_shape(tmp_path / "src") == (D, 2)
    torch.testing.assert_close(stage1.bottleneck.quantizer.codebook, vae.quantize.embedding.weight, rtol=0, atol=0)
    x = images()
    fields, stats = stage1.encode_fields(x)
    with torch.no_grad():
        h = vae.encode(x).latents  # (B, D, 8, 8), before quantisation
        quant, _, (_, _, idx) = vae.quantize(h)
    assert sorted(fields) == ["indices"] and fields["indices"].shape == (3, 8, 8)
    assert torch.equal(fields["indices"], idx.view(3, 8, 8))
    z_q = stage1.latent(fields)
    torch.testing.assert_close(z_q, quant, rtol=0, atol=ATOL)
    torch.testing.assert_close(stats, z_q, rtol=0, atol=ATOL)

    decoder = DiffusersDecoder.from_source(tmp_path / "src").eval()
    assert_decoders_differ(decoder, vae)
    assert decoder.spatial == (variant == "spatial_norm")
    with torch.no_grad():
        x_hat = decoder(z_q)
    out = export_diffusers(decoder, tmp_path / "src", tmp_path / "out")
    loaded = diffusers.VQModel.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z_q).sample, x_hat, rtol=0, atol=ATOL)
        torch.testing.assert_close(loaded.decode(z_q, force_not_quantize=True).sample, x_hat, rtol=0, atol=ATOL)
        # the VQModel's own path, encode -> decode (which quantizes), decodes what the cache holds
        torch.testing.assert_close(loaded.decode(loaded.encode(x).latents).sample, x_hat, rtol=0, atol=ATOL)
        # cached indices are diffusers' codes: its codebook lookup gives the same z_q
        entry = loaded.quantize.get_codebook_entry(fields["indices"].flatten(), (3, 8, 8, D))
        torch.testing.assert_close(entry, z_q, rtol=0, atol=0)
    assert load_stage1(out).sha256 == stage1.sha256


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_latent_cache_round_trip(tmp_path, kind):
    """encode with the adapter -> LatentCache.build -> read back -> our decoder -> export -> from_pretrained."""
    vae = (save_kl if kind == "kl" else save_vq)(tmp_path / "src")
    stage1 = load_stage1(tmp_path / "src")
    x = images(6)
    dataset = ArrayDataset(x.numpy(), labels=np.arange(6))
    cache = LatentCache.build(
        tmp_path / "cache",
        dataset,
        stage1.encode_fields,
        batch_size=4,
        shard_size=4,
        encoder_sha256=stage1.sha256,
        dataset_fingerprint="six-images",
        progress=False,
    )
    cache = LatentCache(tmp_path / "cache")  # reopened: every shard's sha256 verified
    cache.check(encoder_sha256=load_stage1(tmp_path / "src").sha256)
    assert len(cache) == 6 and cache.channel_mean.shape == (stage1.latent_channels,)
    fields = cache.gather(list(range(6)))
    assert torch.equal(fields["label"], torch.arange(6))
    z = stage1.latent(fields, sample=False)  # (6, C, 8, 8)
    direct, _ = stage1.encode_fields(x)
    if kind == "kl":  # stored as float16
        torch.testing.assert_close(z, direct["mean"], rtol=1e-3, atol=1e-3)
    else:  # indices are exact
        assert torch.equal(fields["indices"], direct["indices"])

    decoder = DiffusersDecoder.from_source(tmp_path / "src").eval()
    with torch.no_grad():
        x_hat = decoder(z)
    out = export_diffusers(decoder, tmp_path / "src", tmp_path / "out")
    loaded = type(vae).from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z).sample, x_hat, rtol=0, atol=ATOL)


def test_decoder_from_source_weights_is_the_source_decoder(tmp_path):
    vae = save_kl(tmp_path / "src")
    decoder = DiffusersDecoder.from_source(tmp_path / "src", init="source").eval()
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(decoder(z), vae.decode(z).sample, rtol=0, atol=ATOL)
    assert set(decoder.state_dict()) == {k for k in vae.state_dict() if k.startswith(("decoder.", "post_quant_conv."))}


def test_decoder_trains_through_last_layer(tmp_path):
    """Stage 2's use: gradients reach every decoder weight, last_layer included; the frozen stage 1 has none."""
    save_kl(tmp_path / "src")
    stage1 = load_stage1(tmp_path / "src")
    assert not any(p.requires_grad for p in stage1.parameters())
    stage1.train()
    assert not stage1.training  # frozen: stays in eval mode
    decoder = DiffusersDecoder.from_source(tmp_path / "src")
    x = images()
    fields, _ = stage1.encode_fields(x)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = (decoder(stage1.latent(fields)) - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        assert decoder.last_layer.grad is not None and decoder.last_layer.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_sha256_follows_the_encoder_side(tmp_path):
    vae = save_kl(tmp_path / "src")
    sha = load_stage1(tmp_path / "src").sha256
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(1.0)
    assert DiffusersStage1(vae).sha256 == sha  # the decoder does not change the latents
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(1.0)
    assert DiffusersStage1(vae).sha256 != sha


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local diffusers model folder"):
        read_config(tmp_path / "nowhere")  # never taken for a Hub repo id
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="AutoencoderKL"):
        load_stage1(tmp_path / "unet")
    save_kl(tmp_path / "kl")
    with pytest.raises(ValueError, match="posterior"):
        load_stage1(tmp_path / "kl", posterior="mode")
    save_kl(tmp_path / "wide", block_out_channels=(16, 16), norm_num_groups=4)
    decoder = DiffusersDecoder.from_source(tmp_path / "wide")
    with pytest.raises(ValueError, match="block_out_channels"):
        export_diffusers(decoder, tmp_path / "kl", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(TypeError, match="DiffusersDecoder"):
        export_diffusers(torch.nn.Conv2d(4, 3, 1), tmp_path / "kl", tmp_path / "out")


def test_import_loads_no_diffusers_or_taming():
    """diffusers / taming are imported when a model is loaded, not when fastdae.integrations names resolve."""
    code = (
        "import sys, fastdae.integrations as I; I.load_stage1, I.DiffusersDecoder, I.export_diffusers;"
        "I.load_taming_stage1, I.TamingDecoder, I.export_taming; import fastdae.pretrained.source;"
        "bad = [m for m in ('diffusers', 'taming') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_train_with_diffusers_stage1(tmp_path, kind, monkeypatch):
    """fastdae.train with stage1.encoder = a diffusers folder: cache -> stage 2 (diffusers' Decoder) ->
    prior -> samples at tiny steps; stage2/diffusers/ loads with from_pretrained and decodes the cached
    latents as the trained decoder does."""
    import fastdae
    from fastdae.config import apply_overrides, preset
    from fastdae.training.checkpoint import load_weights

    vae = (save_kl if kind == "kl" else save_vq)(tmp_path / "src")
    cfg = apply_overrides(
        preset("tiny"),
        [f"out_dir={tmp_path / 'run'}", "stages=cache,stage2,prior,samples", f"stage1.encoder={tmp_path / 'src'}"],
    )
    from fastdae.training import stage2

    def stage2_without_encoder(r, run=stage2.run):  # the stages after the cache free the encoder's weights
        assert r.pretrained_stage1.encoder is None
        return run(r)

    monkeypatch.setattr(stage2, "run", stage2_without_encoder)
    result = fastdae.train(cfg)
    stages = result.metrics["stages"]
    assert set(stages) == {"cache", "stage2", "prior", "samples"}
    assert sorted(stages["cache"]["fields"]) == (["label", "logvar", "mean"] if kind == "kl" else ["indices", "label"])
    assert result.sample_grid is not None and result.sample_grid.is_file()

    cache = LatentCache(tmp_path / "run" / "cache")
    stage1 = load_stage1(tmp_path / "src")
    cache.check(encoder_sha256=stage1.sha256)
    decoder = DiffusersDecoder.from_source(tmp_path / "src")
    load_weights(tmp_path / "run" / "stage2" / "decoder.safetensors", decoder)
    loaded = type(vae).from_pretrained(stages["stage2"]["diffusers"], local_files_only=True).eval()
    z = stage1.latent(cache.gather([0, 1, 2]), sample=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z).sample, decoder.eval()(z), rtol=0, atol=ATOL)
    fastdae.sample(tmp_path / "run", num_samples=4, out=tmp_path / "samples.npz")  # the sampler takes the run too
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (4, 16, 16, 3)


def test_config_rejects_stage1_with_a_pretrained_encoder(tmp_path):
    from fastdae.config import ConfigError, apply_overrides, check_environment, preset

    with pytest.raises(ConfigError, match="stages must not list 'stage1'"):
        apply_overrides(preset("tiny"), [f"stage1.encoder={tmp_path}"])
    cfg = apply_overrides(preset("tiny"), ["stages=cache,stage2", f"stage1.encoder={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="stage1.encoder"):
        check_environment(cfg)
    save_kl(tmp_path / "src")
    cfg = apply_overrides(preset("tiny"), ["stages=cache,stage2", f"stage1.encoder={tmp_path / 'src'}", "data.size=17"])
    with pytest.raises(ConfigError, match="downsampling factor 2"):
        check_environment(cfg)
