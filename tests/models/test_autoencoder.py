"""Autoencoder, bottlenecks, weak decoder and PatchGAN pieces (fastdae/models/autoencoder.py, discriminator.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fastdae.models import autoencoder as ae_mod
from fastdae.models.autoencoder import (
    AE_SIZES,
    Autoencoder,
    AutoencoderConfig,
    Decoder,
    Encoder,
    KLBottleneck,
    WeakDecoderConfig,
    autoencoder_config,
    build_decoder,
    build_encoder,
)
from fastdae.models.discriminator import NLayerDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("ch_mult,size", [([1, 2], 16), ([1, 2, 2], 16), ([1, 1, 2, 2], 32)])
def test_kl_shapes_and_gradients(ch_mult, size):
    cfg = AutoencoderConfig(bottleneck="kl", ch=8, ch_mult=ch_mult, z_channels=3)
    model = Autoencoder(cfg, build_decoder(cfg))
    x = torch.rand(2, 3, size, size) * 2 - 1
    x_hat, aux = model(x)
    assert x_hat.shape == x.shape and aux.dim() == 0
    fields, latent = model.encode_fields(x)
    f = cfg.downsample
    assert cfg.downsample == 2 ** (len(ch_mult) - 1)
    assert fields["mean"].shape == fields["logvar"].shape == latent.shape == (2, 3, size // f, size // f)
    (x_hat - x).abs().mean().add(aux).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_kl_term_matches_closed_form():
    mean, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).clamp(-2, 2)
    _, kl = KLBottleneck()(torch.cat([mean, logvar], 1))
    # KL(N(m, s^2) || N(0, 1)) = 0.5 (m^2 + s^2 - 1 - log s^2), summed per sample, mean over batch
    ref = (
        torch.distributions.kl_divergence(
            torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
        )
        .flatten(1)
        .sum(1)
        .mean()
    )
    torch.testing.assert_close(kl, ref)
    fields, stats = KLBottleneck().encode_fields(torch.cat([mean, logvar], 1))
    torch.testing.assert_close(KLBottleneck().latent(fields, sample=False), mean)
    assert not torch.equal(KLBottleneck().latent(fields), KLBottleneck().latent(fields))  # fresh draw per call


def test_kl_weight_scales_aux_like_ldm():
    cfg = AutoencoderConfig(bottleneck="kl", ch=8, ch_mult=[1, 2], kl_weight=1e-6)
    model = Autoencoder(cfg, build_decoder(cfg))
    x = torch.rand(2, 3, 16, 16)
    torch.manual_seed(1)
    _, aux = model(x)
    torch.manual_seed(1)
    _, kl = model.bottleneck(model.encoder(x))
    torch.testing.assert_close(aux, 1e-6 * kl / (3 * 16 * 16))


def test_vq_shapes_and_latent_lookup():
    cfg = AutoencoderConfig(bottleneck="vq", ch=8, ch_mult=[1, 2], z_channels=4, num_codes=16)
    model = Autoencoder(cfg, build_decoder(cfg))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat, aux = model(x)
    assert x_hat.shape == x.shape and aux.dim() == 0
    model.eval()
    fields, z_q = model.encode_fields(x)
    assert fields["indices"].shape == (2, 8, 8) and fields["indices"].max() < 16
    torch.testing.assert_close(model.bottleneck.latent(fields), z_q)


def test_attention_mid_block():
    cfg = AutoencoderConfig(bottleneck="kl", ch=16, ch_mult=[1, 2], attn=True)
    model = Autoencoder(cfg, build_decoder(cfg))
    blocks = [m for m in model.modules() if isinstance(m, ae_mod.AttnBlock)]
    assert len(blocks) == 2  # encoder and decoder mid blocks
    x = torch.rand(1, 3, 8, 8)
    x_hat, _ = model(x)
    x_hat.sum().backward()
    assert blocks[0].qkv.weight.grad is not None
    # the block equals softmax attention written out
    blk = blocks[0].eval()
    h = torch.randn(2, 32, 3, 3)
    B, C = 2, 32
    q, k, v = blk.qkv(blk.norm(h)).reshape(B, 3, C, 9).unbind(1)  # (B, C, N) each, one head
    att = torch.softmax(q.transpose(1, 2) @ k / C**0.5, dim=-1)  # (B, N, N)
    ref = h + blk.proj((v @ att.transpose(1, 2)).reshape(B, C, 3, 3))
    torch.testing.assert_close(blk(h), ref, atol=1e-5, rtol=1e-4)


def test_weak_decoder_knobs():
    cfg = AutoencoderConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=2)
    full = build_decoder(cfg)
    weak = build_decoder(cfg, WeakDecoderConfig(width_mult=0.5, num_res_blocks=1, dropout=0.3))
    assert isinstance(weak, Decoder)

    def n_params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert n_params(weak) < n_params(full) / 3
    drops = [m for m in weak.modules() if isinstance(m, nn.Dropout2d)]
    assert len(drops) == 3 and all(d.p == 0.3 for d in drops)  # one per residual block, 1 block x 3 levels
    assert not any(isinstance(m, nn.Dropout2d) for m in full.modules())
    assert weak.conv_in.out_channels == 32  # ch 16 x ch_mult[-1] 2
    z = torch.randn(2, 4, 4, 4)
    assert weak(z).shape == full(z).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="width_mult"):
        WeakDecoderConfig(width_mult=0.0)


def test_weak_width_rounding_is_announced():
    cfg = AutoencoderConfig(ch=16, ch_mult=[1, 2])
    with pytest.warns(UserWarning, match=r"width_mult=0.25 x ch=16 = 4 channels, rounded to 8"):
        narrow = build_decoder(cfg, WeakDecoderConfig(width_mult=0.25))
    assert narrow.conv_in.out_channels == build_decoder(cfg, WeakDecoderConfig(width_mult=0.5)).conv_in.out_channels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact width says nothing
        build_decoder(cfg, WeakDecoderConfig(width_mult=0.5))


def test_build_decoder_never_builds_an_encoder(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Encoder constructed")

    monkeypatch.setattr(Encoder, "__init__", refuse)
    cfg = AutoencoderConfig(ch=16, ch_mult=[1, 2])
    build_decoder(cfg)
    build_decoder(cfg, WeakDecoderConfig())
    with pytest.raises(AssertionError, match="Encoder constructed"):
        build_encoder(cfg)


def test_size_registry_and_validation():
    for name, spec in AE_SIZES.items():
        cfg = autoencoder_config(name, bottleneck="kl")
        assert cfg.downsample == int(name.split("/")[1]) and cfg.ch == spec["ch"]
    with pytest.raises(ValueError, match="unknown autoencoder size"):
        autoencoder_config("AE-X/4")
    with pytest.raises(ValueError, match="bottleneck"):
        AutoencoderConfig(bottleneck="ae")


def test_discriminator_and_hinge_losses():
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    logits = disc(torch.randn(3, 3, 32, 32))
    assert logits.shape[:2] == (3, 1) and logits.shape[-1] > 1  # a grid of patch logits
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.2])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.6)
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.425))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(1.4))


def test_adaptive_weight_formula():
    w = nn.Parameter(torch.randn(4, 4))
    x = torch.randn(8, 4)
    rec = (x @ w).abs().mean()
    g = -(x @ w).sum() * 3
    lam = adaptive_weight(rec, g, w, 0.8)
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_g = torch.autograd.grad(g, w)[0]
    torch.testing.assert_close(lam, (g_rec.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4) * 0.8)
    assert not lam.requires_grad
    rec = 100 * (x @ w).abs().sum()
    flat = adaptive_weight(rec, (x @ w).sum() * 1e-12, w, 0.8)  # ||grad L_G|| ~ 0: lambda hits the clamp
    assert flat.item() == pytest.approx(1e4 * 0.8)


def test_generator_gan_term_sees_the_discriminator_the_d_step_trains():
    """L_G must score x_hat with the function L_D trains: D on the [x; x_hat] batch (BatchNorm in
    training mode normalises with that batch's statistics). D(x_hat) alone is a different function,
    one the generator can drive to 'real' while D still separates real from fake perfectly."""
    from fastdae.config import AEStageConfig
    from fastdae.models.losses import AutoencoderLoss

    torch.manual_seed(0)
    cfg = AEStageConfig(lpips_weight=0.0)
    cfg.disc.ndf, cfg.disc.start = 8, 0
    crit = AutoencoderLoss(cfg, torch.device("cpu"))
    x = torch.randn(4, 3, 16, 16)
    head = nn.Conv2d(3, 3, 1)
    x_hat = head(x + 3.0)  # fakes whose statistics differ from the reals'
    _, terms = crit.generator_loss(x, x_hat, 0.0, step=0, last_layer=head.weight)
    fake = crit.discriminator(torch.cat([x, x_hat.detach()])).chunk(2)[1]
    torch.testing.assert_close(terms["g"], hinge_g_loss(fake))
    assert not torch.allclose(terms["g"], hinge_g_loss(crit.discriminator(x_hat.detach())))


def test_group_norm_never_degenerates_to_instance_norm():
    """One channel per GroupNorm group is instance norm: it erases each channel's per-image mean and
    scale, i.e. the colour of flat shapes (the default preset's ch=16 decoders lost colour that way,
    results/prior-diagnosis). Every group holds >= 4 channels; VQGAN's widths keep its 32 groups."""
    from fastdae.config import preset

    ae = preset("default").autoencoder
    weak = preset("default").weak_decoder
    modules = [ae_mod.build_encoder(ae), ae_mod.build_decoder(ae), ae_mod.build_decoder(ae, weak)]
    norms = [m for net in modules for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(n.num_channels // n.num_groups >= 4 for n in norms), sorted(
        {(n.num_channels, n.num_groups) for n in norms}
    )
    assert ae_mod._norm(128).num_groups == 32 and ae_mod._norm(512).num_groups == 32


def test_chroma_term_weighs_colour_errors_only():
    """chroma_l1 is the L1 of the error's two opponent-colour components: zero for an error along grey
    (brightness), |e| for a unit-axis colour error; with chroma_weight > 0 the generator loss adds
    chroma_weight times it and logs it (float64 reference); chroma_weight 0 is the plain L1."""
    from fastdae.config import AEStageConfig
    from fastdae.models.losses import CHROMA_AXES, AutoencoderLoss, chroma_l1

    torch.testing.assert_close(CHROMA_AXES @ CHROMA_AXES.T, torch.eye(2))
    torch.testing.assert_close(CHROMA_AXES @ torch.ones(3), torch.zeros(2), rtol=0, atol=1e-7)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 7, generator=gen, dtype=torch.float64) * 2 - 1
    assert chroma_l1(x, x + 0.3).item() == pytest.approx(0.0, abs=1e-12)  # a grey shift: no colour error
    red_green = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1) / 2**0.5
    assert chroma_l1(x, x - 0.2 * red_green).item() == pytest.approx(0.2 / 2)  # |0.2| on one of 2 axes
    x_hat = x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * 0.1
    d = x - x_hat
    want = torch.stack([(d[:, 0] - d[:, 1]) / 2**0.5, (d[:, 0] + d[:, 1] - 2 * d[:, 2]) / 6**0.5]).abs().mean()
    torch.testing.assert_close(chroma_l1(x, x_hat), want)
    plain, weighted = (
        AutoencoderLoss(AEStageConfig(lpips_weight=0.0, chroma_weight=w), torch.device("cpu")) for w in (0.0, 3.0)
    )
    loss0, terms0 = plain.generator_loss(x, x_hat, 0.0, step=0, last_layer=torch.zeros(1))
    loss3, terms3 = weighted.generator_loss(x, x_hat, 0.0, step=0, last_layer=torch.zeros(1))
    assert "chroma" not in terms0 and terms3["chroma"].item() == pytest.approx(want.item())
    torch.testing.assert_close(loss0, d.abs().mean())
    torch.testing.assert_close(loss3, d.abs().mean() + 3.0 * want)


def test_linear_skip_starts_at_zero_and_maps_each_latent_pixel_to_its_patch():
    cfg = AutoencoderConfig(ch=16, ch_mult=[1, 2, 2], z_channels=4, linear_skip=True)
    plain = build_decoder(AutoencoderConfig(ch=16, ch_mult=[1, 2, 2], z_channels=4))
    for dec in (build_decoder(cfg), build_decoder(cfg, WeakDecoderConfig(dropout=0.0))):
        assert isinstance(dec.skip, nn.ConvTranspose2d) and dec.skip.kernel_size == dec.skip.stride == (4, 4)
    dec = build_decoder(cfg)
    assert dec.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["skip.weight", "skip.bias"]
    z = torch.randn(2, 4, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(dec(z), plain(z), rtol=0, atol=0)  # a fresh skip adds exactly zero
        dec.skip.weight.normal_()
        dz = torch.zeros_like(z)
        dz[0, :, 1, 2] = 1.0  # one latent pixel changes: only its 4 x 4 patch moves through the skip
        moved = (dec.skip(z + dz) - dec.skip(z)).abs().sum(1)[0] > 0
    expected = torch.zeros(12, 20, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(moved, expected)
    assert build_decoder(AutoencoderConfig()).skip is None  # off by default
