"""LPIPS: the fused head (forward + backward) and the whole loss, fastdae vs the reference eager
composition vs the public lpips formula written eagerly vs the reference head torch.compile'd
(GPU only: inductor's CPU build takes minutes here), at VGG16 feature shapes.

    pytest benchmarks/bench_lpips.py --benchmark-only

Groups are `lpips-head-<img>px-B<b>` and `lpips-loss-<img>px-B<b>`; compare members within a group.
GPU: 256x256 and 64x64 images, batch 16. CPU: smaller (so the file runs in a few minutes on 2 cores).
extra_info: peak extra memory of one step (bytes) and, for the head, effective GB/s
(forward reads both maps, backward reads both and writes both gradients: 6 passes).
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import (
    HAS_CUDA,
    peak_extra_memory,
    two_x_rule,
)  # benchmarks/conftest.py (pytest puts its folder on sys.path)

from fastdae.kernels.lpips import EPS, lpips_head, lpips_head_ref
from fastdae.nn.lpips import CHANNELS, LPIPS

# (image size, batch) per device
HEAD_CASES = [(256, 16), (64, 16)] if HAS_CUDA else [(256, 1), (64, 4)]
LOSS_CASES = [(256, 16), (64, 16)] if HAS_CUDA else [(64, 2)]
HEAD_DTYPES = [torch.float32, torch.bfloat16] if HAS_CUDA else [torch.float32]


def public_lpips_head(feats0, feats1, weights):
    """The lpips package's head as it is written there: sqrt-of-sum norm, 1x1 conv, spatial mean."""
    out = 0
    for f0, f1, w in zip(feats0, feats1, weights, strict=True):
        u0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + EPS)
        u1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + EPS)
        out = out + torch.nn.functional.conv2d((u0 - u1) ** 2, w.to(f0.dtype).view(1, -1, 1, 1)).mean(dim=(2, 3))
    return out[:, 0]


@functools.cache
def _compiled_head():
    return torch.compile(lpips_head_ref)


def compiled_head(feats0, feats1, weights):
    if not HAS_CUDA:
        pytest.skip("the torch.compile'd head is measured on GPU (inductor's CPU build takes minutes here)")
    if feats0[0].shape[-1] != 256:
        pytest.skip("the torch.compile'd head is measured at 256 px (one compile per shape and dtype)")
    return _compiled_head()(feats0, feats1, weights)


HEADS = {
    "fastdae": lambda f0, f1, w: lpips_head(f0, f1, w),
    "reference": lpips_head_ref,
    "public-lpips": public_lpips_head,
    "torch-compile": compiled_head,
}


def vgg_feature_shapes(img: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of relu1_2 ... relu5_3 for an img x img input."""
    return [(c, img >> i, img >> i) for i, c in enumerate(CHANNELS)]


@pytest.mark.parametrize("dtype", HEAD_DTYPES, ids=str)
@pytest.mark.parametrize("member", list(HEADS))
@pytest.mark.parametrize("img, batch", HEAD_CASES, ids=[f"{i}px-B{b}" for i, b in HEAD_CASES])
def test_lpips_head_fwd_bwd(benchmark, timed, bench_device, img, batch, member, dtype):
    benchmark.group = f"lpips-head-{img}px-B{batch}-{str(dtype).removeprefix('torch.')}"
    shapes = vgg_feature_shapes(img)
    f0 = [torch.randn(batch, *s, device=bench_device, dtype=dtype).relu_().requires_grad_() for s in shapes]
    f1 = [torch.randn(batch, *s, device=bench_device, dtype=dtype).relu_().requires_grad_() for s in shapes]
    w = [torch.rand(c, device=bench_device) for c in CHANNELS]
    head = HEADS[member]

    def step():
        return torch.autograd.grad(head(f0, f1, w).sum(), f0 + f1)

    step()  # warm-up: JIT build / Triton compile / torch.compile
    with torch.no_grad():  # the head's value vs float64, next to the eager reference in this dtype
        f0_64, f1_64 = [f.double() for f in f0], [f.double() for f in f1]
        accuracy = two_x_rule(
            head(f0, f1, w), lpips_head_ref(f0_64, f1_64, [x.double() for x in w]), lpips_head_ref(f0, f1, w)
        )
    peak = peak_extra_memory(step, bench_device)
    seconds = timed(step, member=member, dtype=str(dtype), peak_extra_bytes=peak, **accuracy)
    map_bytes = sum(f.numel() * f.element_size() for f in f0)
    benchmark.extra_info["effective_gbps"] = 6 * map_bytes / seconds / 1e9


def _reference_loss(model: LPIPS, head):
    """The eager composition: the same trunk, then an eager head."""
    return lambda x, target: head(model.features(x), model.features(target), model.lin_weights)


@pytest.mark.parametrize("member", ["fastdae", "fastdae-bf16-cl", "reference", "public-lpips"])
@pytest.mark.parametrize("img, batch", LOSS_CASES, ids=[f"{i}px-B{b}" for i, b in LOSS_CASES])
def test_lpips_loss_fwd_bwd(benchmark, timed, bench_device, img, batch, member):
    if member == "fastdae-bf16-cl" and not HAS_CUDA:
        pytest.skip("bf16 channels_last trunk is a GPU option")
    benchmark.group = f"lpips-loss-{img}px-B{batch}"
    gpu_opts = dict(trunk_dtype=torch.bfloat16, channels_last=True) if member == "fastdae-bf16-cl" else {}
    model = LPIPS(random_init=True, check_range=False, **gpu_opts).to(bench_device)
    loss_fn = {
        "fastdae": model.loss,
        "fastdae-bf16-cl": model.loss,
        "reference": _reference_loss(model, lpips_head_ref),
        "public-lpips": _reference_loss(model, public_lpips_head),
    }[member]
    x = (torch.rand(batch, 3, img, img, device=bench_device) * 2 - 1).requires_grad_()
    target = torch.rand(batch, 3, img, img, device=bench_device) * 2 - 1

    def step():
        return torch.autograd.grad(loss_fn(x, target).mean(), x)

    step()
    peak = peak_extra_memory(step, bench_device)
    seconds = timed(step, member=member, peak_extra_bytes=peak)
    benchmark.extra_info["images_per_s"] = batch / seconds
