"""LPIPS: the fused head (Triton, C++, reference) against a float64 reference, and the LPIPS module
(weight files, equality with trunk + reference head, input validation)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fastdae import _ext
from fastdae.kernels.lpips import EPS, lpips_head, lpips_head_ref
from fastdae.nn.lpips import CHANNELS, LIN_KEY, LPIPS, SCALE, SHIFT, VGG16Trunk, bundled_lin_weights
from tests.utils import DTYPES, assert_close_to_ref

HAS_CPP = _ext.available("lpips")
CPP = pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="C++ op not built"))
IMPLS = ["triton", CPP, "ref"]

# named layer lists (C, H, W) per layer: odd channel counts, 1x1 and 7x9 maps, a VGG-like pyramid
LAYER_SETS = {
    "odd": [(3, 7, 9), (64, 1, 1), (65, 7, 9)],
    "vgg16x16": [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512, 1, 1)],
}
# mixed: feats0 channels_last, feats1 contiguous; transposed: feats0 W-major, feats1 channels_last
LAYOUTS = ["contiguous", "channels_last", "mixed", "transposed"]
B = 2


def make_feats(layers, batch=B, dtype=torch.float64) -> tuple[list, list, list]:
    """Non-negative features, as VGG's ReLUs produce, with no all-zero position (tested on its own)."""
    f0 = [torch.randn(batch, *s, dtype=dtype).abs() for s in layers]
    f1 = [(f + 0.5 * torch.randn_like(f)).abs() for f in f0]
    w = [torch.rand(s[0], dtype=torch.float32) for s in layers]
    return f0, f1, w


def head_with_grads(f0, f1, w, impl, dtype, layout="contiguous", upstream=None):
    """(out, grads0, grads1, leaves0, leaves1) of lpips_head on copies of f0, f1 cast to dtype."""
    fmt0 = torch.channels_last if layout in ("channels_last", "mixed") else torch.contiguous_format
    fmt1 = torch.channels_last if layout in ("channels_last", "transposed") else torch.contiguous_format
    x0 = [f.detach().to(dtype).clone(memory_format=fmt0).requires_grad_() for f in f0]
    x1 = [f.detach().to(dtype).clone(memory_format=fmt1).requires_grad_() for f in f1]
    if layout == "transposed":  # feats0 stored W-major: H and W strides do not flatten to one
        x0 = [f.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_() for f in x0]
    out = lpips_head(x0, x1, w, impl=impl)
    out.backward(upstream.to(out.dtype) if upstream is not None else torch.ones_like(out))
    return out, [x.grad for x in x0], [x.grad for x in x1], x0, x1


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(
        a.is_contiguous(memory_format=f) == b.is_contiguous(memory_format=f)
        for f in (torch.contiguous_format, torch.channels_last)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layers", list(LAYER_SETS.values()), ids=list(LAYER_SETS))
@pytest.mark.parametrize("impl", IMPLS)
def test_head_matches_float64_reference(impl, layers, dtype, layout):
    f0, f1, w = make_feats(layers)
    upstream = torch.rand(B, dtype=torch.float64) + 0.5
    ref = head_with_grads(f0, f1, w, "ref", torch.float64, upstream=upstream)
    plain = head_with_grads(f0, f1, w, "ref", dtype, upstream=upstream)  # plain torch in this dtype
    out, g0, g1, x0, x1 = head_with_grads(f0, f1, w, impl, dtype, layout, upstream=upstream)
    assert out.shape == (B,) and out.dtype == torch.float32
    assert_close_to_ref(out, ref[0], plain[0], "out")
    for i in range(len(layers)):
        assert g0[i].dtype == g1[i].dtype == dtype
        if impl != "ref":  # the kernels return gradients laid out like torch.empty_like(features)
            assert same_layout(g0[i], torch.empty_like(x0[i])) and same_layout(g1[i], x1[i])
        assert_close_to_ref(g0[i], ref[1][i], plain[1][i], f"grad0[{i}]")
        assert_close_to_ref(g1[i], ref[2][i], plain[2][i], f"grad1[{i}]")


def public_lpips_head(feats0, feats1, weights):
    """The lpips package's formula, written out: sqrt of the squared norm (NaN gradient at 0)."""
    out = 0
    for f0, f1, w in zip(feats0, feats1, weights, strict=True):
        u0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + EPS)
        u1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + EPS)
        out = out + torch.nn.functional.conv2d((u0 - u1) ** 2, w.to(f0.dtype).view(1, -1, 1, 1)).mean(dim=(2, 3))[:, 0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_head_gradient_finite_at_zero_features(impl, dtype):
    """At f = 0 the exact gradient is a / eps (finite in fp32/bf16; fp16 cannot hold it)."""
    f0, f1, w = make_feats([(65, 7, 9), (3, 1, 1)])
    f0[0][0, :, 2, 3] = 0  # one zero position in feats0 only
    f0[0][1, :, :, :4] = 0  # zero positions in both maps
    f1[0][1, :, :, :4] = 0
    f1[1].zero_()  # a whole layer of zeros
    ref = head_with_grads(f0, f1, w, "ref", torch.float64)
    plain = head_with_grads(f0, f1, w, "ref", dtype)
    out, g0, g1, _, _ = head_with_grads(f0, f1, w, impl, dtype)
    assert all(torch.isfinite(g).all() for g in g0 + g1)
    assert_close_to_ref(out, ref[0], plain[0], "out")
    for i in range(2):
        assert_close_to_ref(g0[i], ref[1][i], plain[1][i], f"grad0[{i}]")
        assert_close_to_ref(g1[i], ref[2][i], plain[2][i], f"grad1[{i}]")
    x1 = [f.clone().requires_grad_() for f in f1]
    public_lpips_head(f0, x1, w).sum().backward()
    assert torch.isnan(x1[1].grad).any(), "the public formula's NaN gradient is what this test guards against"


@pytest.mark.parametrize("impl", IMPLS)
def test_head_only_needed_gradient(impl):
    """feats1 without requires_grad (the real-image branch): only dL/dfeats0 is computed."""
    f0, f1, w = make_feats(LAYER_SETS["odd"], dtype=torch.float32)
    x0 = [f.clone().requires_grad_() for f in f0]
    lpips_head(x0, f1, w, impl=impl).sum().backward()
    r0 = [f.clone().requires_grad_() for f in f0]
    expected = torch.autograd.grad(lpips_head_ref(r0, f1, w).sum(), r0)
    for x, g in zip(x0, expected, strict=True):
        torch.testing.assert_close(x.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["auto", CPP])
def test_head_opcheck_and_compile(impl):
    """The ops through the dispatcher (CPU: the C++ kernels when built, else the reference) pass
    opcheck, and lpips_head compiles (fullgraph) to the eager value."""
    from fastdae.kernels.lpips import _lpips_head_backward_op, _lpips_head_op

    f0, f1, w = make_feats(LAYER_SETS["odd"], dtype=torch.float32)
    x0 = [f.clone().requires_grad_() for f in f0]
    x1 = [f.clone().requires_grad_() for f in f1]
    torch.library.opcheck(_lpips_head_op, (x0, x1, w))
    for need0, need1 in ((True, False), (True, True)):
        torch.library.opcheck(_lpips_head_backward_op, (torch.rand(B), f0, f1, w, need0, need1))
    compiled = torch.compile(lambda a, b: lpips_head(a, b, w, impl=impl), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(f0, f1), lpips_head(f0, f1, w, impl=impl))


def test_triton_launchers_match_the_fakes():
    """The CUDA kernels (the Triton launchers, here interpreted) return what the fakes promise,
    channels_last maps included."""
    from fastdae.kernels.lpips import _bwd_fake, _bwd_triton, _fwd_fake, _fwd_triton

    f0, f1, w = make_feats(LAYER_SETS["odd"], dtype=torch.float32)
    f1 = [f.to(memory_format=torch.channels_last) for f in f1]
    out, fake = _fwd_triton(f0, f1, w), _fwd_fake(f0, f1, w)
    assert (out.shape, out.dtype) == (fake.shape, fake.dtype)
    real, fake = _bwd_triton(torch.rand(B), f0, f1, w, True, True), _bwd_fake(torch.rand(B), f0, f1, w, True, True)
    for r, f in zip(real[0] + real[1], fake[0] + fake[1], strict=True):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


def test_reference_backward_kernel_matches_autograd():
    """The backward op's reference kernel (the CPU's without the C++ extension) is the ref's gradient."""
    from fastdae.kernels.lpips import _bwd_reference

    f0, f1, w = make_feats(LAYER_SETS["odd"], dtype=torch.float64)
    x0, x1 = [f.clone().requires_grad_() for f in f0], [f.clone().requires_grad_() for f in f1]
    grad = torch.rand(B, dtype=torch.float64)
    expected = torch.autograd.grad(lpips_head_ref(x0, x1, w), x0 + x1, grad)
    g0, g1 = _bwd_reference(grad, f0, f1, w, True, True)
    for g, e in zip(g0 + g1, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize(
    "change, err, match",
    [
        (lambda f0, f1, w: (f0, f1[:1], w), ValueError, "one length"),
        (lambda f0, f1, w: (f0, [f1[0][:, :2]] + f1[1:], w), ValueError, r"feats1\[0\]"),
        (lambda f0, f1, w: (f0, f1, [w[0][:2]] + w[1:]), ValueError, r"weights\[0\]"),
        (lambda f0, f1, w: ([f.long() for f in f0], [f.long() for f in f1], w), TypeError, "dtype"),
        (lambda f0, f1, w: (f0[0], f1, w), TypeError, "list of tensors"),
    ],
)
def test_head_validation(change, err, match):
    f0, f1, w = make_feats(LAYER_SETS["odd"], dtype=torch.float32)
    with pytest.raises(err, match=match):
        lpips_head(*change(f0, f1, w))


@pytest.mark.parametrize("shape", [(2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)], ids=["C0", "H0", "W0"])
@pytest.mark.parametrize("impl", ["auto", "triton", "cpp", "ref"])
def test_head_rejects_empty_channels_or_positions(impl, shape):
    """C = 0 (a division by zero in the kernels) and H * W = 0 (a mean over nothing: NaN) are refused
    in Python, before any kernel or C++ call."""
    f = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"C >= 1 channels and H \* W >= 1 positions"):
        lpips_head([f], [f.clone()], [torch.ones(shape[1])], impl=impl)


def test_head_rejects_unknown_impl_and_learned_weights():
    f0, f1, w = make_feats(LAYER_SETS["odd"], dtype=torch.float32)
    with pytest.raises(ValueError, match="impl"):
        lpips_head(f0, f1, w, impl="cuda")
    with pytest.raises(ValueError, match="require grad"):
        lpips_head(f0, f1, [x.requires_grad_() for x in w], impl="triton")


# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------
def torchvision_state() -> dict[str, torch.Tensor]:
    """A random state dict in torchvision vgg16's format (features.* and classifier.*)."""
    state = {k: torch.randn_like(v) for k, v in VGG16Trunk().state_dict().items()}
    state["classifier.0.weight"] = torch.randn(8, 4)  # torchvision's head: ignored by the trunk
    return state


def lin_state() -> dict[str, torch.Tensor]:
    return {LIN_KEY.format(i): torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_weight_files_round_trip(tmp_path, fmt):
    trunk, lins = torchvision_state(), lin_state()
    trunk_path, lin_path = tmp_path / f"vgg16.{fmt}", tmp_path / f"lin.{fmt}"
    for state, path in ((trunk, trunk_path), (lins, lin_path)):
        save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    model = LPIPS(trunk_weights=trunk_path, lin_weights=lin_path)
    loaded = model.trunk.state_dict()
    assert loaded.keys() == {k for k in trunk if k.startswith("features.")}
    for key, value in loaded.items():
        torch.testing.assert_close(value, trunk[key], rtol=0, atol=0, msg=key)
    for i, w in enumerate(model.lin_weights):
        torch.testing.assert_close(w, lins[LIN_KEY.format(i)].flatten(), rtol=0, atol=0)
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.train().trunk.training, "the trunk stays in eval mode"


def test_bad_weight_files(tmp_path):
    trunk = torchvision_state()
    trunk["features.16.weight"] = torch.randn(3)  # vgg19 has a conv where vgg16 pools
    torch.save(trunk, tmp_path / "vgg19.pth")
    with pytest.raises(ValueError, match="not a torchvision vgg16"):
        LPIPS(trunk_weights=tmp_path / "vgg19.pth", random_init=True)
    trunk = torchvision_state()
    trunk["features.0.weight"] = torch.randn(64, 3, 5, 5)
    save_file(trunk, str(tmp_path / "vgg16-5x5.safetensors"))
    with pytest.raises(ValueError, match=r"features.0.weight has shape \(64, 3, 5, 5\)"):
        LPIPS(trunk_weights=tmp_path / "vgg16-5x5.safetensors", random_init=True)
    lins = lin_state()
    lins[LIN_KEY.format(2)] = torch.rand(1, 3, 1, 1)
    torch.save(lins, tmp_path / "lin.pth")
    with pytest.raises(ValueError, match=r"lin2.model.1.weight must be a \(1, 256, 1, 1\)"):
        LPIPS(lin_weights=tmp_path / "lin.pth", random_init=True)
    lins = lin_state()
    lins[LIN_KEY.format(4)] = -lins[LIN_KEY.format(4)]
    torch.save(lins, tmp_path / "lin-negative.pth")
    with pytest.raises(ValueError, match="negative"):
        LPIPS(lin_weights=tmp_path / "lin-negative.pth", random_init=True)
    with pytest.raises(ValueError, match="trunk_weights is required"):
        LPIPS()
    with pytest.raises(FileNotFoundError):
        LPIPS(trunk_weights=tmp_path / "absent.pth")


@pytest.mark.skipif(bundled_lin_weights() is None, reason="lpips package not installed (pip install --no-deps lpips)")
def test_bundled_lin_weights_load(tmp_path):
    torch.save(torchvision_state(), tmp_path / "vgg16.pth")
    model = LPIPS(trunk_weights=tmp_path / "vgg16.pth")
    bundled = torch.load(bundled_lin_weights(), map_location="cpu", weights_only=True)
    for i, w in enumerate(model.lin_weights):
        torch.testing.assert_close(w, bundled[LIN_KEY.format(i)].flatten(), rtol=0, atol=0)


@pytest.mark.parametrize("normalize", [False, True])
def test_module_equals_trunk_plus_reference_head(normalize):
    model = LPIPS(random_init=True, normalize=normalize)
    x0 = torch.rand(B, 3, 32, 32) * (1 if normalize else 2) - (0 if normalize else 1)
    x1 = (x0 + 0.1 * torch.randn_like(x0)).clamp(x0.min().item(), x0.max().item())
    a = x0.clone().requires_grad_()
    out = model(a, x1)
    out.sum().backward()

    def feats(x):  # the composition spelled out: [0, 1] -> [-1, 1], lpips scaling, trunk
        x = 2 * x - 1 if normalize else x
        return model.trunk((x - torch.tensor(SHIFT).view(1, 3, 1, 1)) / torch.tensor(SCALE).view(1, 3, 1, 1))

    b = x0.clone().requires_grad_()
    ref = lpips_head_ref(feats(b), feats(x1), model.lin_weights)
    ref.sum().backward()
    torch.testing.assert_close(out.reshape(-1), ref, rtol=1e-5, atol=1e-7)  # out: (B, 1, 1, 1), as lpips
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_module_loss_target_branch_no_grad():
    model = LPIPS(random_init=True)
    x, target = torch.rand(B, 3, 16, 16) * 2 - 1, (torch.rand(B, 3, 16, 16) * 2 - 1).requires_grad_()
    x.requires_grad_()
    loss = model.loss(x, target)
    torch.testing.assert_close(loss, model(x, target))
    loss.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and target.grad is None


@pytest.mark.parametrize(
    "x0, x1, match",
    [
        (torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 17), "same shape"),
        (torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16), r"\(B, 3, H, W\)"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), "at least 16x16"),
        (torch.zeros(2, 3, 16, 16), torch.full((2, 3, 16, 16), 255.0), r"in \[-1, 1\]"),
    ],
)
def test_module_input_validation(x0, x1, match):
    with pytest.raises(ValueError, match=match):
        LPIPS(random_init=True)(x0, x1)


# ------------------------------------------------------------------------------------------------
# GPU: real VGG feature shapes and the bf16 / channels_last trunk
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("img", [64, 256])
def test_head_vgg_shapes_gpu(img, dtype, layout):
    layers = [(c, img >> i, img >> i) for i, c in enumerate(CHANNELS)]
    f0, f1, w = make_feats(layers, batch=4)
    f0, f1, w = [f.cuda() for f in f0], [f.cuda() for f in f1], [x.cuda() for x in w]
    upstream = torch.rand(4, dtype=torch.float64, device="cuda") + 0.5
    ref = head_with_grads(f0, f1, w, "ref", torch.float64, upstream=upstream)
    plain = head_with_grads(f0, f1, w, "ref", dtype, upstream=upstream)
    out, g0, g1, _, _ = head_with_grads(f0, f1, w, "triton", dtype, layout, upstream=upstream)
    assert_close_to_ref(out, ref[0], plain[0], "out")
    for i in range(len(layers)):
        assert_close_to_ref(g0[i], ref[1][i], plain[1][i], f"grad0[{i}]")
        assert_close_to_ref(g1[i], ref[2][i], plain[2][i], f"grad1[{i}]")


@pytest.mark.gpu
def test_module_bf16_channels_last_trunk_gpu():
    fp32 = LPIPS(random_init=True).cuda()
    fast = LPIPS(random_init=True, trunk_dtype=torch.bfloat16, channels_last=True).cuda()
    fast.load_state_dict(fp32.state_dict())
    x0 = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    x1 = (x0 + 0.2 * torch.randn_like(x0)).clamp(-1, 1)
    x = x0.clone().requires_grad_()
    out = fast.loss(x, x1)
    out.sum().backward()
    assert out.dtype == torch.float32 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out, fp32(x0, x1), rtol=5e-2, atol=1e-4)


def test_module_compiles_fullgraph():
    model = LPIPS(random_init=True)
    x, target = torch.rand(B, 3, 16, 16) * 2 - 1, torch.rand(B, 3, 16, 16) * 2 - 1
    compiled = torch.compile(model.loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, target), model.loss(x, target))
