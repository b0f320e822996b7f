"""VQ kernels: vq_nearest and vector_quantize (Triton under the interpreter, C++, reference) against
float64, over named edge shapes and dtypes; every gradient; ties; errors; empty input; opcheck and
torch.compile."""

from __future__ import annotations

import pytest
import torch

from fastdae import _ext
from fastdae.kernels.vq import VQOutput, vector_quantize, vector_quantize_ref, vq_nearest, vq_nearest_ref
from tests.utils import DTYPES, assert_close_to_ref

HAS_CPP = _ext.available("vq")
CPP = pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="C++ op not built"))
IMPLS = ["triton", CPP, "ref"]
KERNEL_IMPLS = ["triton", CPP]

# (N, K, D): Triton blocks are 64 rows x 128 codes x 64 (fp32) / 128 (16-bit) dims; C++ tiles 2048 codes
SHAPES = {
    "N1": (1, 37, 16),
    "N_tail": (97, 64, 32),
    "K1": (33, 1, 8),
    "K_tail": (50, 300, 24),
    "D_odd": (40, 50, 7),
    "D3": (20, 20, 3),
    "D200_chunks": (24, 40, 200),
    "D256": (18, 33, 256),
    "K_cpp_tiles": (5, 2100, 4),
}


def nearest_check(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor, sqdist: torch.Tensor) -> None:
    """The chosen code's exact distance is the minimum (up to fp32 accumulation) and sqdist is it."""
    x64, c64 = x.double(), codebook.double()
    # (N, K) in float64: the expansion's rounding (~1e-16 of scale) is far below the tolerance
    full = (x64.square().sum(1, keepdim=True) + c64.square().sum(1) - 2 * x64 @ c64.t()).clamp_min(0)
    chosen = full.gather(1, idx[:, None])[:, 0]
    scale = x64.square().sum(1) + c64.square().sum(1).max()  # magnitude of the expanded terms
    gap = chosen - full.min(1).values
    assert (gap <= 1e-5 * scale).all(), f"chosen code not nearest: max gap {gap.max().item():.3g}"
    torch.testing.assert_close(sqdist.double(), chosen, rtol=1e-5, atol=1e-6 * scale.max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_nearest_is_nearest(impl, shape, dtype):
    N, K, D = shape
    x, codebook = torch.randn(N, D).to(dtype), torch.randn(K, D).to(dtype)
    idx, sqdist = vq_nearest(x, codebook, impl=impl)
    assert idx.shape == (N,) and idx.dtype == torch.int64
    assert sqdist.shape == (N,) and sqdist.dtype == torch.float32
    nearest_check(x, codebook, idx, sqdist)


def separated(N: int, K: int, D: int, dtype: torch.dtype, noise: float = 0.05):
    """Codes far apart and x near known codes, so every correct implementation picks `truth`."""
    codebook = (torch.randn(K, D) * 3).to(dtype)
    truth = torch.randint(K, (N,))
    x = (codebook[truth].float() + noise * torch.randn(N, D)).to(dtype)
    return x, codebook, truth


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [SHAPES[k] for k in ("N_tail", "K_tail", "D_odd", "D256")], ids=["N_tail", "K_tail", "D_odd", "D256"]
)
@pytest.mark.parametrize("impl", IMPLS)
def test_nearest_exact_on_separated_codes(impl, shape, dtype):
    x, codebook, truth = separated(*shape, dtype)
    idx, _ = vq_nearest(x, codebook, impl=impl)
    assert torch.equal(idx, truth)
    assert torch.equal(idx, vq_nearest_ref(x.double(), codebook.double())[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_nearest_ties_take_lowest_index(impl):
    """Duplicate codes within a tile, across Triton tiles (128) and across C++ tiles (2048)."""
    codebook = torch.randn(2100, 4)
    for low, high in ((3, 9), (7, 200), (11, 2090)):
        codebook[high] = codebook[low]
    x = codebook[[3, 7, 11, 9, 200, 2090]] + 1e-3
    idx, _ = vq_nearest(x, codebook, impl=impl)
    assert idx.tolist() == [3, 7, 11, 3, 7, 11]


@pytest.mark.parametrize("impl", IMPLS)
def test_nearest_sqdist_gradients(impl):
    """sqdist is differentiable: 2 (x - c_idx) to x, the negative summed into the chosen codes."""
    x, codebook, _ = separated(45, 20, 9, torch.float32, noise=0.5)
    x.requires_grad_()
    codebook.requires_grad_()
    weight = torch.rand(45)
    idx, sqdist = vq_nearest(x, codebook, impl=impl)
    gx, gc = torch.autograd.grad((sqdist * weight).sum(), (x, codebook))
    x64, c64 = x.detach().double().requires_grad_(), codebook.detach().double().requires_grad_()
    d64 = (x64 - c64[idx]).square().sum(1)
    ex, ec = torch.autograd.grad((d64 * weight.double()).sum(), (x64, c64))
    torch.testing.assert_close(gx.double(), ex, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc.double(), ec, rtol=1e-5, atol=1e-5)


def quantize_with_grads(z, codebook, impl, dtype, upstream, beta=0.25):
    """(VQOutput, dz, dcodebook) for L = sum(z_q * upstream) + 3 * loss, inputs cast to dtype."""
    zl = z.detach().to(dtype).requires_grad_()
    cl = codebook.detach().to(dtype).requires_grad_()
    fn = vector_quantize_ref if impl == "ref-plain" else lambda a, b, beta: vector_quantize(a, b, beta, impl=impl)
    out = fn(zl, cl, beta)
    total = (out.z_q.float() * upstream.float()).sum() + 3 * out.loss
    gz, gc = torch.autograd.grad(total, (zl, cl))
    return out, gz, gc


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "zshape, K", [((2, 5, 7, 13), 40), ((97, 32), 300), ((3, 200), 17)], ids=["maps_D13", "N_tail_K_tail", "D200"]
)
@pytest.mark.parametrize("impl", IMPLS)
def test_vector_quantize_outputs_and_gradients(impl, zshape, K, dtype):
    D = zshape[-1]
    flat, codebook, truth = separated(int(torch.tensor(zshape[:-1]).prod()), K, D, torch.float64, noise=0.3)
    z = flat.view(zshape)
    upstream = torch.randn(zshape, dtype=torch.float64)
    ref, rz, rc = quantize_with_grads(z, codebook, "ref", torch.float64, upstream)
    plain, pz, pc = quantize_with_grads(z, codebook, "ref-plain", dtype, upstream)  # plain torch in dtype
    out, gz, gc = quantize_with_grads(z, codebook, impl, dtype, upstream)
    assert isinstance(out, VQOutput)
    assert out.z_q.shape == zshape and out.z_q.dtype == dtype
    assert out.indices.shape == zshape[:-1] and out.indices.dtype == torch.int64
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert torch.equal(out.indices.view(-1), truth) and torch.equal(ref.indices.view(-1), truth)
    torch.testing.assert_close(out.z_q, codebook.to(dtype)[out.indices], rtol=0, atol=0)  # exact gather
    assert_close_to_ref(out.loss, ref.loss, plain.loss, "loss")
    assert_close_to_ref(gz, rz, pz, "grad z")
    assert_close_to_ref(gc, rc, pc, "grad codebook")


@pytest.mark.parametrize("impl", IMPLS)
def test_vector_quantize_loss_convention(impl):
    """beta weighs the commitment term (grad to z), 1 the codebook term (grad to the codebook)."""
    z, codebook, _ = separated(30, 6, 5, torch.float32, noise=0.4)
    z.requires_grad_()
    codebook.requires_grad_()
    out = vector_quantize(z, codebook, beta=0.5, impl=impl)
    diff = (z - codebook[out.indices]).detach()
    torch.testing.assert_close(out.loss, 1.5 * diff.square().mean())
    gz, gc = torch.autograd.grad(out.loss, (z, codebook))
    torch.testing.assert_close(gz, 0.5 * 2 * diff / diff.numel())
    expected = torch.zeros_like(codebook).index_add_(0, out.indices, -2 * diff / diff.numel())
    torch.testing.assert_close(gc, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_inputs(impl):
    codebook = torch.randn(5, 4, requires_grad=True)
    idx, sqdist = vq_nearest(torch.randn(0, 4), codebook.detach(), impl=impl)
    assert idx.shape == sqdist.shape == (0,) and idx.dtype == torch.int64 and sqdist.dtype == torch.float32
    for shape in ((0, 4), (2, 0, 4)):
        z = torch.randn(shape, requires_grad=True)
        out = vector_quantize(z, codebook, impl=impl)
        assert out.z_q.shape == shape and out.indices.shape == shape[:-1] and out.loss.item() == 0.0
        gz, gc = torch.autograd.grad(out.loss + out.z_q.sum(), (z, codebook), allow_unused=True)
        assert gz.shape == shape and (gc is None or not gc.any())


C = torch.randn(6, 4)
X = torch.randn(3, 4)


@pytest.mark.parametrize(
    "fn, err, match",
    [
        (lambda: vq_nearest(X[None], C), ValueError, r"x must be \(N, D\)"),
        (lambda: vq_nearest(X, C[:, :3]), ValueError, r"codebook must be \(K, D=4\)"),
        (lambda: vq_nearest(X, C[0]), ValueError, r"codebook must be \(K, D=4\)"),
        (lambda: vq_nearest(X, C[:0]), ValueError, "empty"),
        (lambda: vq_nearest(X.long(), C.long()), TypeError, "x must have a dtype in"),
        (lambda: vq_nearest(X, C.double()), TypeError, "codebook must have x's dtype"),
        (lambda: vq_nearest(X.double(), C.double(), impl="cpp"), TypeError, "dtype"),
        (lambda: vq_nearest(X, C.to("meta")), ValueError, "on meta"),
        (lambda: vq_nearest(X, torch.cat([C, torch.full((1, 4), float("nan"))])), ValueError, "non-finite"),
        (lambda: vq_nearest(X, C, impl="cuda"), ValueError, "impl must be one of"),
        (lambda: vq_nearest(X.numpy(), C), TypeError, "x must be a tensor"),
        (lambda: vector_quantize(torch.tensor(1.0), C), ValueError, r"z must be \(\.\.\., D\)"),
        (lambda: vector_quantize(X, C[:, :2]), ValueError, "D=4"),
        (lambda: vector_quantize(X, C.half()), TypeError, "codebook must have z's dtype"),
        (lambda: vector_quantize(X, C.clone().fill_(float("inf"))), ValueError, "non-finite"),
        (lambda: vector_quantize(X, C, beta=-1.0), ValueError, "beta"),
    ],
)
def test_validation(fn, err, match):
    with pytest.raises(err, match=match):
        fn()


@pytest.mark.parametrize("impl", ["auto", CPP])
def test_opcheck_and_compile(impl):
    """The ops through the dispatcher (CPU: the C++ kernels when built, else the reference) pass
    opcheck and compile (fullgraph) to the eager values and gradients."""
    from fastdae.kernels.vq import _vector_quantize_op, _vq_nearest_op

    x, codebook, _ = separated(21, 10, 6, torch.float32, noise=0.3)
    xg, cg = x.clone().requires_grad_(), codebook.clone().requires_grad_()
    torch.library.opcheck(_vq_nearest_op, (xg, cg))
    torch.library.opcheck(_vector_quantize_op, (xg, cg, 0.25))

    def step(z, c):
        out = vector_quantize(z, c, impl=impl)
        return out.loss + (out.z_q * out.z_q).sum(), vq_nearest(z, c, impl=impl)[0]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    (loss_c, idx_c), (loss_e, idx_e) = compiled(xg, cg), step(xg, cg)
    torch.testing.assert_close(loss_c, loss_e)
    assert torch.equal(idx_c, idx_e)
    grads_c = torch.autograd.grad(loss_c, (xg, cg))
    grads_e = torch.autograd.grad(loss_e, (xg, cg))
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b)


def test_triton_launchers_match_the_fakes():
    """The CUDA kernels (the Triton launchers, here interpreted) return what the fakes promise."""
    from fastdae.kernels.vq import _nearest_cuda, _nearest_fake, _vector_quantize_fake, _vector_quantize_triton

    x, codebook = torch.randn(21, 6)[:, :5], torch.randn(10, 5)  # a strided x
    for real, fake in (
        (_nearest_cuda(x, codebook), _nearest_fake(x, codebook)),
        (_vector_quantize_triton(x, codebook, 0.25), _vector_quantize_fake(x, codebook, 0.25)),
    ):
        for r, f in zip(real, fake, strict=True):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


@pytest.mark.skipif(not HAS_CPP, reason="C++ op not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_kernels_opcheck(dtype):
    """The C++ CPU kernels in every dtype, for contiguous and strided x."""
    from fastdae.kernels.vq import _vector_quantize_op, _vq_nearest_op

    x, codebook = torch.randn(70, 9).to(dtype), torch.randn(13, 9).to(dtype)
    for xs in (x, x.t().contiguous().t()):
        torch.library.opcheck(_vq_nearest_op, (xs, codebook))
        torch.library.opcheck(_vector_quantize_op, (xs, codebook, 0.25))


@pytest.mark.skipif(not HAS_CPP, reason="C++ op not built")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N, K, D", [(1999, 1500, 40), (301, 257, 256)], ids=["many_row_blocks", "D256_panel_tiles"])
def test_cpp_nearest_many_blocks(N, K, D, threads):
    """The C++ micro-kernel past the named edge shapes: dozens of row blocks shared by threads, code
    tiles and padded panels; nearest within tolerance and the reference's indices on separated codes."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, codebook = torch.randn(N, D), torch.randn(K, D)
        nearest_check(x, codebook, *vq_nearest(x, codebook, impl="cpp"))
        x, codebook, truth = separated(N, K, D, torch.float32)
        assert torch.equal(vq_nearest(x, codebook, impl="cpp")[0], truth)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "shape", [SHAPES[k] for k in ("N_tail", "K_tail", "D_odd", "D256")], ids=["N_tail", "K_tail", "D_odd", "D256"]
)
def test_triton_3xtf32_split_is_exact_to_fp32(shape):
    """The GPU's fp32 path (x split into TF32 hi + lo once per program, the codebook tile once per
    tile, three TF32 products), run here by forcing PRECISION="3xtf32" in the interpreter."""
    import dataclasses

    from fastdae.kernels._launch import launch
    from fastdae.kernels.vq import code_aug, nearest_launch, row_aug

    x, codebook, truth = separated(*shape, torch.float32, noise=0.3)
    idx, dist = torch.empty(len(x), dtype=torch.int64), torch.empty(len(x))
    plan = nearest_launch(x, row_aug(x), codebook, *code_aug(codebook), idx, dist, None)
    launch(dataclasses.replace(plan, constexprs={**plan.constexprs, "PRECISION": "3xtf32"}))
    assert torch.equal(idx, truth)
    nearest_check(x, codebook, idx, dist)


@pytest.mark.parametrize("seg_bits", [0, 1, 5])
def test_triton_packed_argmin_across_segments(seg_bits):
    """The kernel's argmin packs (score bits, tile in segment) into one int and folds segments of
    2^SEG_BITS tiles into a per-row best: forced to 1- and 2-tile segments here (K = 700: five full
    128-code tiles and a tail), ties across tiles, across segments and into the tail keep the lowest
    index, and every chosen code is the nearest against float64."""
    import dataclasses

    from fastdae.kernels._launch import launch
    from fastdae.kernels.vq import code_aug, nearest_launch, row_aug

    codebook = torch.randn(700, 4)
    for low, high in ((5, 130), (140, 300), (3, 650), (260, 690)):  # same tile pair / across segments / tail
        codebook[high] = codebook[low]
    x = torch.cat([codebook[[5, 140, 3, 260, 130, 650]] + 1e-3, torch.randn(90, 4)])
    idx, dist = torch.empty(len(x), dtype=torch.int64), torch.empty(len(x))
    plan = nearest_launch(x, row_aug(x), codebook, *code_aug(codebook), idx, dist, None)
    launch(dataclasses.replace(plan, constexprs={**plan.constexprs, "SEG_BITS": seg_bits}))
    assert idx[:6].tolist() == [5, 140, 3, 260, 5, 3]
    nearest_check(x, codebook, idx, dist)


def test_triton_nonfinite_codebook_gives_nan_without_sync():
    """On CUDA a non-finite codebook is not checked on the host (that is a sync per call): the kernel
    returns NaN distances (so vector_quantize's loss is NaN) and in-range indices."""
    from fastdae.kernels.vq import _nearest_triton

    x, codebook = torch.randn(20, 8), torch.randn(300, 8)
    for bad in (float("nan"), float("inf")):
        cb = codebook.clone()
        cb[257, 3] = bad
        idx, dist = _nearest_triton(x, cb, None)
        assert dist.isnan().all() and ((idx >= 0) & (idx < len(cb))).all()


def test_alignment_flag():
    from fastdae.kernels._launch import align_elems

    assert align_elems(torch.empty(16, 8, dtype=torch.bfloat16), torch.empty(32, 8, dtype=torch.bfloat16)) == 8
    assert align_elems(torch.empty(16, 7), torch.empty(32, 7)) == 1  # 28-byte rows


@pytest.mark.gpu
def test_no_host_sync_gpu():
    x, codebook = torch.randn(4096, 32, device="cuda"), torch.randn(1024, 32, device="cuda")
    vq_nearest(x, codebook)  # compile outside the check
    vector_quantize(x, codebook)
    torch.cuda.set_sync_debug_mode("error")
    try:
        vq_nearest(x, codebook)
        vector_quantize(x, codebook)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, K, D", [(65536, 16384, 64), (16411, 4097, 256), (8192, 65536, 8)])
def test_gpu_large(N, K, D, dtype):
    """Real-GPU Triton at training sizes: nearest within fp32 tolerance (checked on a row sample
    against float64), indices equal the reference on separated codes, vector_quantize gradients."""
    dev = torch.device("cuda")
    x, codebook = torch.randn(N, D, device=dev).to(dtype), torch.randn(K, D, device=dev).to(dtype)
    idx, sqdist = vq_nearest(x, codebook)
    rows = torch.randperm(N, device=dev)[:512]
    nearest_check(x[rows], codebook, idx[rows], sqdist[rows])
    z, cb, truth = separated(N, K, D, dtype, noise=1e-3)
    z, cb = z.to(dev).requires_grad_(), cb.to(dev).requires_grad_()
    out = vector_quantize(z, cb)
    assert torch.equal(out.indices.cpu(), truth)
    ref = vector_quantize_ref(z.double(), cb.double())
    upstream = torch.randn_like(z)
    g = torch.autograd.grad((out.z_q * upstream).sum() + out.loss, (z, cb))
    e = torch.autograd.grad((ref.z_q * upstream.double()).sum() + ref.loss, (z, cb))
    for a, b in zip(g, e, strict=True):
        assert (a.double() - b).norm() <= 1e-2 * b.norm() + 1e-6


def near_ties(N: int, K: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, D) and codes on spheres around each row whose radii differ by 2e-4 relative: far above
    fp32's rounding, far below bf16's (2^-8), so a bf16 coarse pass alone cannot rank them. Every row's
    codes are shuffled among the others' (a row's nearest is its own smallest sphere). Returns
    (x, codebook, the float64 argmin)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) * 10
    per = K // N
    radius = 3 * (1 + 2e-4 * torch.randperm(per * N, generator=g).double().view(N, per))
    w = torch.nn.functional.normalize(torch.randn(N, per, D, generator=g, dtype=torch.float64), dim=-1)
    codes = (x[:, None] + radius[..., None] * w).view(-1, D)
    codebook = codes[torch.randperm(len(codes), generator=g)].float()
    xf = x.float()
    full = torch.cdist(xf.double(), codebook.double()).square()
    return xf, codebook, full.argmin(1)


@pytest.mark.skipif(not HAS_CPP, reason="C++ op not built")
@pytest.mark.parametrize("N, K, D", [(64, 2048, 64), (32, 1024, 256), (40, 640, 17), (96, 960, 32)])
def test_cpp_nearest_is_exact_on_near_ties_below_bf16_resolution(N, K, D):
    # With AMX the coarse pass is bf16 (csrc/vq_amx.h) and the fp32 re-rank of direct differences must
    # find the float64 argmin exactly (the gaps are far above fp32 rounding). The fp32 micro-kernel
    # of the other paths ranks by the expanded score ||c||^2 / 2 - x.c, exact to its rounding only.
    x, codebook, truth = near_ties(N, K, D)
    idx, sqdist = vq_nearest(x, codebook, impl="cpp")
    if _ext.cpu_isa() == "amx":
        assert torch.equal(idx, truth), f"{(idx != truth).sum().item()} rows off"
    nearest_check(x, codebook, idx, sqdist)


@pytest.mark.skipif(not HAS_CPP, reason="C++ op not built")
@pytest.mark.parametrize("D", [16, 64, 256])
def test_cpp_nearest_takes_the_lowest_of_duplicate_codes(D):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(50, D, generator=g)
    codebook = torch.cat([base, base, base])  # code k, k + 50 and k + 100 are equal
    x = base[torch.randint(50, (200,), generator=g)] + 0.01 * torch.randn(200, D, generator=g)
    idx, _ = vq_nearest(x, codebook, impl="cpp")
    full = torch.cdist(x.double(), codebook.double()).square()
    assert (idx < 50).all() and torch.equal(idx, full[:, :50].argmin(1))
