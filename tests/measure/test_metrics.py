"""fastdae.measure, models.inception, models.classifier: against closed forms and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fastdae import measure
from fastdae.data import ProceduralShapes
from fastdae.models.autoencoder import Decoder
from fastdae.models.classifier import classifier_accuracy, train_classifier
from fastdae.models.inception import FIDInceptionV3

C1, C2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2  # SSIM constants for data range 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_spd(d: int, gen: torch.Generator) -> Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------
def test_frechet_diagonal_closed_form():
    # commuting (diagonal) covariances: tr sqrt(S_a S_b) = sum_i sqrt(a_i b_i)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1, torch.rand(6, generator=gen, dtype=torch.float64)
    mu_a, mu_b = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    expect = ((mu_a - mu_b) ** 2).sum() + (a + b - 2 * (a * b).sqrt()).sum()
    got = measure.frechet_distance((mu_a, torch.diag(a)), (mu_b, torch.diag(b)))
    assert got == pytest.approx(expect.item(), rel=1e-10)


def test_frechet_2x2_non_commuting_closed_form():
    # for a 2x2 PSD M: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); M = S_a^1/2 S_b S_a^1/2 has
    # tr M = tr(S_a S_b) and det M = det S_a det S_b
    s_a = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    s_b = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=torch.float64)
    mu_a, mu_b = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    tr_sqrt = math.sqrt((s_a @ s_b).trace().item() + 2 * math.sqrt(torch.det(s_a).item() * torch.det(s_b).item()))
    expect = ((mu_a - mu_b) ** 2).sum().item() + s_a.trace().item() + s_b.trace().item() - 2 * tr_sqrt
    assert measure.frechet_distance((mu_a, s_a), (mu_b, s_b)) == pytest.approx(expect, rel=1e-10)


def test_frechet_from_features_invariances():
    gen = torch.Generator().manual_seed(2)
    fa = torch.randn(300, 5, generator=gen) @ torch.randn(5, 5, generator=gen)
    fb = torch.randn(300, 5, generator=gen) * 2 + 1
    fd = measure.frechet_distance(fa, fb)
    # matches the same formula on numpy's unbiased statistics, with the square root from eigh
    sa, sb = np.cov(fa.double().numpy(), rowvar=False), np.cov(fb.double().numpy(), rowvar=False)
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(root @ sb @ root)).sum()
    dmu = fa.double().numpy().mean(0) - fb.double().numpy().mean(0)
    assert fd == pytest.approx(dmu @ dmu + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt, rel=1e-8)
    assert measure.frechet_distance(fb, fa) == pytest.approx(fd, rel=1e-8)  # symmetric
    assert measure.frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-9)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen))
    shift = torch.randn(5, generator=gen)
    assert measure.frechet_distance(fa @ q + shift, fb @ q + shift) == pytest.approx(fd, rel=1e-6)  # isometry
    assert measure.frechet_distance(fa * 3, fb * 3) == pytest.approx(9 * fd, rel=1e-6)  # squared distance
    assert measure.frechet_distance(measure.gaussian_stats(fa), fb) == pytest.approx(fd, rel=1e-12)


def test_frechet_singular_covariance_and_errors():
    gen = torch.Generator().manual_seed(3)
    fa, fb = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)  # rank 3 < 16
    fd = measure.frechet_distance(fa, fb)
    assert math.isfinite(fd) and fd > 0
    with pytest.raises(ValueError, match="one D"):
        measure.frechet_distance(fa, torch.randn(4, 8))
    with pytest.raises(ValueError, match="N >= 2"):
        measure.frechet_distance(fa[:1], fb)


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------------
def test_psnr_hand_cases():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    assert torch.isinf(measure.psnr(x, x)).all()
    offsets = torch.tensor([0.1, 0.5, 1.0]).view(3, 1, 1, 1)
    got = measure.psnr(x, x + offsets)  # MSE = c^2 -> 20 log10(2 / c)
    assert torch.allclose(got, 20 * torch.log10(2 / offsets.view(3).double()), atol=1e-4)
    assert measure.psnr(x, x + 0.5, data_range=1.0)[0].item() == pytest.approx(20 * math.log10(2.0), abs=1e-4)
    with pytest.raises(ValueError, match="same shape"):
        measure.psnr(x, x[:, :2])


def test_ssim_identical_constant_and_scaled_constant():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(measure.ssim(x, x), torch.ones(2, dtype=torch.float64))
    # constant images a, b: sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly
    for a, b in [(0.5, 0.25), (-0.3, 0.6), (0.8, 0.8 * 0.5)]:
        got = measure.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)).item()
        assert got == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), rel=1e-6)


@pytest.mark.parametrize("size", [11, 5])  # 5 < 11: the window shrinks to the image
def test_ssim_single_window_by_hand(size):
    # a size x size image has exactly one window position: weighted statistics written out with numpy
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, size, size, generator=gen, dtype=torch.float64) * 2 - 1
    y = 0.7 * x + 0.2 * torch.rand(1, 1, size, size, generator=gen, dtype=torch.float64)
    k = np.arange(size) - (size - 1) / 2
    g = np.exp(-(k**2) / (2 * 1.5**2))
    w = np.outer(g, g) / g.sum() ** 2
    xn, yn = x[0, 0].numpy(), y[0, 0].numpy()
    mx, my = (w * xn).sum(), (w * yn).sum()
    vx, vy = (w * (xn - mx) ** 2).sum(), (w * (yn - my) ** 2).sum()
    cxy = (w * (xn - mx) * (yn - my)).sum()
    expect = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    assert measure.ssim(x, y).item() == pytest.approx(expect, rel=1e-9)


def test_ssim_images_smaller_than_window():
    x = torch.rand(2, 3, 6, 5) * 2 - 1  # window 5 (largest odd <= 5), two positions per column
    assert torch.allclose(measure.ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert measure.ssim(x[:, :, :1, :1], x[:, :, :1, :1] + 0.5).shape == (2,)  # 1x1: luminance term only


def test_lpips_distance_batches_the_model():
    from fastdae.nn import LPIPS

    model = LPIPS(random_init=True)
    x, y = torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1
    got = measure.lpips_distance(x, y, model, batch_size=2)
    assert got.shape == (3,) and torch.allclose(got, model(x, y).reshape(-1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Complexity probes on linear decoders z -> W z, whose norms are known exactly
# ---------------------------------------------------------------------------------------------
Z_SHAPE, X_SHAPE = (3, 2, 2), (3, 4, 4)  # latent dim 12, image dim 48


def _linear_decoder(w: Tensor):
    return lambda z: (z.flatten(1) @ w.T).view(-1, *X_SHAPE)


def _matrix_with_singular_values(s: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    u, _ = torch.linalg.qr(torch.randn(48, 12, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    return (u * s) @ v.T, v  # W = U diag(s) V^T, right singular vectors V


def test_jacobian_spectral_norm_linear():
    gen = torch.Generator().manual_seed(5)
    s = torch.tensor([5.0, 2.5, 2.0, 1.5, 1.0, 1.0, 0.8, 0.5, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    w, _ = _matrix_with_singular_values(s, gen)
    z = torch.randn(10, *Z_SHAPE, generator=gen, dtype=torch.float64)
    assert measure.jacobian_spectral_norm(_linear_decoder(w), z, iters=20, batch_size=4) == pytest.approx(5.0, rel=1e-6)


def test_jacobian_frobenius_hutchinson_linear():
    gen = torch.Generator().manual_seed(6)
    s = torch.linspace(3.0, 0.5, 12, dtype=torch.float64)
    w_general, _ = _matrix_with_singular_values(s, gen)  # U diag(s) V^T: columns not orthogonal
    z = torch.randn(8, *Z_SHAPE, generator=gen, dtype=torch.float64)
    # orthogonal columns (W = Q diag(s)): ||W v||^2 = sum_i s_i^2 v_i^2 = ||W||_F^2 for every +-1 vector
    w_diag = torch.linalg.qr(torch.randn(48, 12, generator=gen, dtype=torch.float64))[0] * s
    sq, fro = measure.jacobian_frobenius_hutchinson(_linear_decoder(w_diag), z, samples=2)
    assert sq == pytest.approx((s**2).sum().item(), rel=1e-10)
    assert fro == pytest.approx(math.sqrt((s**2).sum().item()), rel=1e-10)
    # a general W: unbiased, so many samples land close
    sq, fro = measure.jacobian_frobenius_hutchinson(_linear_decoder(w_general), z, samples=256)
    assert sq == pytest.approx((s**2).sum().item(), rel=0.05)
    assert fro == pytest.approx(w_general.norm().item(), rel=0.03)


def test_lipschitz_lower_bound_linear():
    gen = torch.Generator().manual_seed(7)
    s = torch.linspace(4.0, 0.5, 12, dtype=torch.float64)
    w, v = _matrix_with_singular_values(s, gen)
    dec = _linear_decoder(w)
    z = torch.randn(16, *Z_SHAPE, generator=gen, dtype=torch.float64)
    bound = measure.lipschitz_lower_bound(dec, z, pairs=32)
    assert 0.5 <= bound <= 4.0 + 1e-9  # between sigma_min and sigma_max for any pair
    # two latents that differ along the top right singular vector attain sigma_max exactly
    pair = torch.stack([z[0], z[0] + 0.3 * v[:, 0].view(Z_SHAPE)])
    assert measure.lipschitz_lower_bound(dec, pair, pairs=4) == pytest.approx(4.0, rel=1e-9)


def test_lipschitz_interpolation_only_tightens():
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1)).double()
    z = torch.randn(12, 3, 4, 4, dtype=torch.float64)
    coarse = measure.lipschitz_lower_bound(dec, z, pairs=16, interpolate=False, seed=3)
    fine = measure.lipschitz_lower_bound(dec, z, pairs=16, interpolate=True, steps=8, seed=3)
    assert fine >= coarse - 1e-12


def test_scale_normalize_removes_latent_scale():
    gen = torch.Generator().manual_seed(8)
    w, _ = _matrix_with_singular_values(torch.linspace(3.0, 0.5, 12, dtype=torch.float64), gen)
    z = torch.randn(32, *Z_SHAPE, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    # the same image map written with latents scaled 10x and a decoder scaled 1/10
    dec_a, z_a = measure.scale_normalize(_linear_decoder(w), z)
    dec_b, z_b = measure.scale_normalize(_linear_decoder(w / 10), z * 10)
    assert torch.allclose(z_a, z_b) and torch.allclose(z_a.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64))
    assert measure.jacobian_spectral_norm(dec_a, z_a) == pytest.approx(
        measure.jacobian_spectral_norm(dec_b, z_b), rel=1e-9
    )
    assert torch.allclose(dec_a(z_a), _linear_decoder(w)(z))


def test_probes_on_an_autoencoder_decoder_use_eval_mode():
    # the library's Decoder (GroupNorm, nearest upsampling, Dropout2d) under jvp/vjp
    torch.manual_seed(0)
    dec = Decoder(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=2, dropout=0.5)
    z = torch.randn(4, 2, 4, 4)
    a = measure.jacobian_spectral_norm(dec, z, iters=5)
    b = measure.jacobian_spectral_norm(dec, z, iters=5)
    assert a == b and a > 0 and dec.training  # dropout off inside, mode restored
    sq, fro = measure.jacobian_frobenius_hutchinson(dec, z, samples=4)
    assert fro > 0 and fro**2 <= sq * (1 + 1e-6)  # Jensen: (mean sqrt)^2 <= mean
    assert measure.lipschitz_lower_bound(dec, z, pairs=4) > 0


# ---------------------------------------------------------------------------------------------
# Capacity and the penalised distance on a toy problem with a known answer
# ---------------------------------------------------------------------------------------------
def _toy_capacity_problem() -> tuple[Tensor, Tensor]:
    """Images are a rank-4 linear function of 8-d latents: a linear bottleneck of width w fits them
    exactly iff w >= 4."""
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(128, 8, 1, 1, generator=gen)
    a = torch.randn(8, 4, generator=gen) @ torch.randn(4, 48, generator=gen) / 4
    return z, (z.flatten(1) @ a).view(-1, *X_SHAPE)


def _bottleneck(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(8, width), nn.Linear(width, 48), nn.Unflatten(1, X_SHAPE))


def test_minimal_capacity_finds_the_rank():
    z, x = _toy_capacity_problem()
    width, family = measure.minimal_capacity(
        _bottleneck, z, x, widths=[1, 2, 3, 4, 6], target_error=1e-3, steps=400, lr=1e-2
    )
    errors = [f.error for f in family]
    assert width == 4, errors
    assert errors[0] > errors[1] > errors[2] > 1e-2 and errors[3] < 1e-3 and errors[4] < 1e-3
    assert [f.params for f in family] == [8 * w + w + 48 * w + 48 for w in (1, 2, 3, 4, 6)]
    none, _ = measure.minimal_capacity(_bottleneck, z, x, widths=[1, 2], target_error=1e-3, steps=50)
    assert none is None
    with pytest.raises(ValueError, match="increasing"):
        measure.minimal_capacity(_bottleneck, z, x, widths=[4, 2], target_error=1e-3, steps=1)


def test_penalised_distance_terms_and_minimum():
    z, x = _toy_capacity_problem()
    _, family = measure.minimal_capacity(_bottleneck, z, x, widths=[1, 2, 4], target_error=1e-3, steps=300, lr=1e-2)
    flatten = nn.Flatten()  # identity features: a Fréchet distance in pixel space (a plain callable, "FD-feat")
    out = measure.penalised_distance(family, z, x, flatten, lam=0.0, complexity="spectral", probe_latents=16)
    terms = out["terms"]
    assert [t["width"] for t in terms] == [1, 2, 4] and out["d_F"] == "FD-feat"
    for t, member in zip(terms, family, strict=True):
        assert t["d_F"] == pytest.approx(measure.frechet_score(flatten, member.decoder(z).detach(), x), rel=1e-9)
        assert t["C"] == pytest.approx(measure.jacobian_spectral_norm(member.decoder, z[:16]), rel=1e-9)
    assert out["width"] == min(terms, key=lambda t: t["d_F"])["width"] == 4  # lam = 0: best fit wins
    big = measure.penalised_distance(family, z, x, flatten, lam=1e6, probe_latents=16)
    assert big["width"] == min(terms, key=lambda t: t["C"])["width"]  # huge lam: least complex wins
    assert big["value"] == pytest.approx(min(t["d_F"] + 1e6 * t["C"] for t in terms), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Feature extractors: the FID Inception loader, the dataset classifier, sample validity
# ---------------------------------------------------------------------------------------------
# a few (key, shape) pairs of pytorch-fid's pt_inception-2015-12-05 file (torchvision Inception3 names)
PUBLISHED_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
}


def _random_fid_state(net: FIDInceptionV3) -> dict[str, Tensor]:
    """What the published file looks like: every parameter and running statistic (random values,
    positive variances), the 1008-way logits layer, no num_batches_tracked."""
    gen = torch.Generator().manual_seed(10)
    state = {}
    for key, t in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        r = torch.rand(t.shape, generator=gen)
        state[key] = r + 0.5 if key.endswith("running_var") else (r - 0.5) * 0.2
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048, generator=gen), torch.zeros(1008)
    return state


def test_fid_inception_round_trip(tmp_path):
    net = FIDInceptionV3()
    for key, shape in PUBLISHED_KEYS.items():
        assert tuple(net.state_dict()[key].shape) == shape, key
    state = _random_fid_state(net)
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded = FIDInceptionV3.from_file(tmp_path / "pt_inception.pth")
    own = loaded.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key  # every tensor landed where it belongs
    loaded.train()
    assert not loaded.training  # batch norm stays on the stored statistics
    feats = loaded(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()
    assert measure.frechet_name(loaded) == "FID" and measure.frechet_name(loaded, reconstruction=True) == "rFID"


def test_fid_inception_rejects_wrong_files(tmp_path):
    net = FIDInceptionV3()
    state = _random_fid_state(net)
    missing = {k: v for k, v in state.items() if k != "Mixed_6c.branch1x1.conv.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing"):
        net.load_fid_weights(tmp_path / "missing.pth")
    torch.save({**state, "Mixed_5b.branch1x1.conv.weight": torch.zeros(64, 192, 3, 3)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="Mixed_5b.branch1x1.conv.weight must have shape"):
        net.load_fid_weights(tmp_path / "shape.pth")
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1008, 768)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected"):
        net.load_fid_weights(tmp_path / "extra.pth")


def test_classifier_learns_procedural_shapes():
    clf = train_classifier(ProceduralShapes(4096, seed=1), steps=200, width=8, seed=0)
    held_out = ProceduralShapes(512, seed=2)
    acc = classifier_accuracy(clf, held_out)
    assert acc >= 0.9
    images, labels = held_out.images(np.arange(512))
    out = measure.sample_validity(clf, images, labels)
    assert out["class_accuracy"] == pytest.approx(acc)
    assert measure.frechet_name(clf) == "FD-feat" and measure.frechet_name(clf, reconstruction=True) == "rFD-feat"
    assert clf.features(images[:4]).shape == (4, clf.feature_dim)


class _FixedLogits(nn.Module):
    """A 'classifier' whose logits are given, to check sample_validity by hand."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits[x[:, 0, 0, 0].long()]  # image i carries its row index in pixel (0, 0, 0)


def test_sample_validity_by_hand():
    p = torch.tensor([[0.95, 0.05, 0.0], [0.5, 0.4, 0.1], [0.05, 0.05, 0.9], [0.2, 0.7, 0.1]])
    clf = _FixedLogits(p.log())
    samples = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    out = measure.sample_validity(clf, samples, labels=torch.tensor([0, 1, 2, 1]), threshold=0.9, batch_size=3)
    assert out == {"validity": 0.5, "class_accuracy": 0.75}  # rows 0, 2 confident; rows 0, 2, 3 right
    assert measure.sample_validity(clf, samples, threshold=0.6)["class_accuracy"] is None
    with pytest.raises(ValueError, match="labels"):
        measure.sample_validity(clf, samples, labels=torch.zeros(3, dtype=torch.long))
