"""fastdae.nn.LPIPS against the real lpips package (0.1.4, installed --no-deps in [dev]).

lpips imports torchvision (for its VGG16 constructor) and scipy at import time, and neither is
installed here (torchvision would replace the CPU torch). So these tests import the real lpips
with two stand-ins in sys.modules: `torchvision.models.vgg16(pretrained=False)` returns fastdae's
VGG16Trunk (torchvision's layer layout and parameter names; a random trunk, as lpips' pnet_rand=True
builds), and scipy.ndimage.zoom is never called. Everything else runs as the package ships it:
ScalingLayer, normalize_tensor, NetLinLayer with dropout, spatial_average, upsample, retPerLayer,
versions 0.1 and 0.0, the baseline (lpips=False), and loading its bundled lin weights.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from fastdae.nn import LPIPS
from fastdae.nn.lpips import VGG16Trunk

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lpips") is None, reason="lpips not installed (pip install --no-deps lpips==0.1.4)"
)


@pytest.fixture(scope="module")
def lpips_pkg():
    """The real lpips package, imported with torchvision's vgg16 and scipy's zoom stood in."""

    def vgg16(pretrained: bool = False, **_):
        assert not pretrained, "the tests never ask lpips for downloaded weights"
        return VGG16Trunk()  # .features: torchvision's vgg16().features[:30]

    models = types.ModuleType("torchvision.models")
    models.vgg16 = vgg16
    torchvision = types.ModuleType("torchvision")
    torchvision.models = models
    ndimage = types.ModuleType("scipy.ndimage")
    ndimage.zoom = None
    scipy = types.ModuleType("scipy")
    scipy.ndimage = ndimage
    stand_ins = {"torchvision": torchvision, "torchvision.models": models, "scipy": scipy, "scipy.ndimage": ndimage}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        import lpips

        yield lpips
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
            del sys.modules[name]


def pair(lpips_pkg, tmp_path, **kw):
    """(theirs, ours): lpips.LPIPS(net="vgg", pnet_rand=True, **kw) and fastdae's with its trunk file."""
    torch.manual_seed(0)
    theirs = lpips_pkg.LPIPS(net="vgg", pnet_rand=True, verbose=False, **kw)
    trunk = {}
    for key, value in theirs.net.state_dict().items():  # slice{k}.{N}.weight -> features.{N}.weight
        _, index, param = key.split(".")
        trunk[f"features.{index}.{param}"] = value
    torch.save(trunk, tmp_path / "vgg16.pth")
    ours = LPIPS(net="vgg", trunk_weights=tmp_path / "vgg16.pth", **kw)
    return theirs, ours


def images(normalize: bool = False, size: int = 16):
    x0 = torch.rand(2, 3, size, size + 8)
    x1 = (x0 + 0.15 * torch.randn_like(x0)).clamp(0, 1)
    return (x0, x1) if normalize else (2 * x0 - 1, 2 * x1 - 1)


def run(model, x0, x1, **kw):
    a, b = x0.clone().requires_grad_(), x1.clone().requires_grad_()
    out = model(a, b, **kw)
    val = out[0] if isinstance(out, tuple) else out
    (val * torch.linspace(0.5, 1.5, val.numel()).view_as(val)).sum().backward()
    return out, a.grad, b.grad


@pytest.mark.parametrize(
    "kw, fwd",
    [
        ({}, {}),
        ({}, {"normalize": True}),
        ({"spatial": True}, {}),
        ({"version": "0.0"}, {}),
        ({"lpips": False}, {}),
        ({"lpips": False, "spatial": True}, {"normalize": True}),
    ],
    ids=["default", "normalize", "spatial", "v0.0", "baseline", "baseline-spatial"],
)
def test_matches_lpips(lpips_pkg, tmp_path, kw, fwd):
    theirs, ours = pair(lpips_pkg, tmp_path, **kw)
    assert not theirs.training and not ours.training  # eval_mode=True
    x0, x1 = images(fwd.get("normalize", False))
    out_t, g0_t, g1_t = run(theirs, x0, x1, **fwd)
    out_o, g0_o, g1_o = run(ours, x0, x1, **fwd)
    assert out_o.shape == out_t.shape == ((2, 1, 16, 24) if kw.get("spatial") else (2, 1, 1, 1))
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-7)
    for g_o, g_t in ((g0_o, g0_t), (g1_o, g1_t)):  # fp32 rounding, relative to the largest gradient
        torch.testing.assert_close(g_o, g_t, rtol=1e-4, atol=1e-5 * g_t.abs().max().item())


def test_bundled_weights_and_ret_per_layer(lpips_pkg, tmp_path):
    theirs, ours = pair(lpips_pkg, tmp_path)
    for i, w in enumerate(ours.lin_weights):  # lpips loaded its bundled v0.1 file; so did fastdae
        torch.testing.assert_close(w, theirs.lins[i].model[1].weight.flatten(), rtol=0, atol=0)
    x0, x1 = images()
    (val_t, layers_t), (val_o, layers_o) = theirs(x0, x1, retPerLayer=True), ours(x0, x1, retPerLayer=True)
    torch.testing.assert_close(val_o, val_t, rtol=1e-5, atol=1e-7)
    assert len(layers_o) == len(layers_t) == 5
    for lo, lt in zip(layers_o, layers_t, strict=True):
        assert lo.shape == lt.shape == (2, 1, 1, 1)
        torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-8)


def test_training_mode_dropout_draws_lpips_masks(lpips_pkg, tmp_path):
    """use_dropout (lpips' default) acts in training mode on the per-layer differences: under one
    seed both draw the same masks; use_dropout=False is deterministic."""
    theirs, ours = pair(lpips_pkg, tmp_path)
    theirs.train(), ours.train()
    x0, x1 = images()
    torch.manual_seed(7)
    out_t = theirs(x0, x1)
    torch.manual_seed(7)
    out_o = ours(x0, x1)
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours(x0, x1), ours.eval()(x0, x1))
    plain = LPIPS(random_init=True, use_dropout=False).train()
    assert torch.equal(plain(x0, x1), plain(x0, x1))


def test_unsupported_arguments_are_named(tmp_path):
    for net in ("alex", "squeeze"):
        with pytest.raises(NotImplementedError, match=f"net='vgg'.*{net}"):
            LPIPS(net=net)
    with pytest.raises(ValueError, match="version must be one of"):
        LPIPS(version="0.2", random_init=True)
    with pytest.raises(ValueError, match="trunk_weights is required.*downloads nothing"):
        LPIPS(net="vgg")
    with pytest.raises(ValueError, match="once"):
        LPIPS(random_init=True, model_path="a.pth", lin_weights="b.pth")


def test_positional_lpips_call_and_taming_broadcast():
    """lpips.LPIPS(True, "vgg") positional order; taming adds (B, 1, 1, 1) to a (B, C, H, W) loss."""
    model = LPIPS(True, "vgg", pnet_rand=True)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x0, x1 = images()
    rec = (x0 - x1).abs()  # taming: rec_loss = |x - x_rec| (B, 3, H, W), then + weight * p_loss
    assert (rec + model(x0, x1)).shape == rec.shape
    tuned = LPIPS(pnet_rand=True, pnet_tune=True)
    assert all(p.requires_grad for p in tuned.trunk.parameters())


def test_loads_an_lpips_state_dict(lpips_pkg, tmp_path):
    """lpips' (and taming's LPIPS') full state dict, e.g. inside a VQGAN checkpoint, loads by key mapping."""
    theirs, _ = pair(lpips_pkg, tmp_path)
    ours = LPIPS(random_init=True)
    ours.load_lpips_state_dict(
        {f"loss.perceptual_loss.{k}": v for k, v in theirs.state_dict().items()}, prefix="loss.perceptual_loss."
    )
    x0, x1 = images()
    torch.testing.assert_close(ours(x0, x1), theirs(x0, x1), rtol=1e-5, atol=1e-7)
    no_dropout = lpips_pkg.LPIPS(net="vgg", pnet_rand=True, use_dropout=False, verbose=False)  # lin{l}.model.0
    ours.load_lpips_state_dict(no_dropout.state_dict())
    torch.testing.assert_close(ours(x0, x1), no_dropout(x0, x1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="not an lpips vgg state dict"):
        ours.load_lpips_state_dict({k: v for k, v in theirs.state_dict().items() if not k.startswith("lin3")})
