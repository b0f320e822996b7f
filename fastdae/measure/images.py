"""Per-image reconstruction metrics (PSNR, SSIM, LPIPS distance) and the conventions every measure
shares: images (B, 3, H, W) in [-1, 1]; decoders are callables latents (B, C, h, w) -> images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Decoder = Callable[[Tensor], Tensor]
FeatureExtractor = Callable[[Tensor], Tensor]  # images (B, 3, H, W) -> features (B, D)
GaussianStats = tuple[Tensor, Tensor]  # mean (D,), covariance (D, D), float64

DATA_RANGE = 2.0  # images in [-1, 1]
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03  # Wang et al. (2004)
VALIDITY_THRESHOLD = 0.9


def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(
            f"{name}: x and y must be (B, C, H, W) of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


@contextmanager
def _eval_mode(fn: Callable) -> Iterator[None]:
    """Modules run in eval mode (no dropout, running norm statistics) inside; the mode is restored."""
    was = fn.training if isinstance(fn, nn.Module) else None
    if was:
        fn.eval()
    try:
        yield
    finally:
        if was:
            fn.train()


def _device_of(fn: Callable, default: Tensor) -> torch.device:
    """Where a module's parameters live (inputs are moved there); the input's device otherwise."""
    param = next(fn.parameters(), None) if isinstance(fn, nn.Module) else None
    return param.device if param is not None else default.device


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)])


# ---------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------
def psnr(x: Tensor, y: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Per-image PSNR in dB, (B,) float64: 10 log10(R^2 / MSE); inf where x == y."""
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).square().flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, x: Tensor) -> Tensor:
    k = torch.arange(size, dtype=torch.float64, device=x.device) - (size - 1) / 2
    g = torch.exp(-k.square() / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, size, size)  # (C, 1, s, s) for a depthwise conv


def ssim(x: Tensor, y: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Per-image SSIM (Wang et al., 2004), (B,) float64: the mean over channels and valid window
    positions of l * cs with Gaussian-weighted local statistics (window 11, sigma 1.5),
    C1 = (0.01 R)^2, C2 = (0.03 R)^2:

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))

    Images smaller than the window use the largest odd window that fits (same sigma, renormalised)."""
    _check_pair(x, y, "ssim")
    x, y = x.double(), y.double()
    size = min(SSIM_WINDOW, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd, so the window has a centre
    w = _gaussian_window(size, SSIM_SIGMA, x.shape[1], x)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=x.shape[1])  # (B, C, H - s + 1, W - s + 1), valid positions only

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


@torch.no_grad()
def lpips_distance(x: Tensor, y: Tensor, model: nn.Module, batch_size: int = 64) -> Tensor:
    """Per-image LPIPS (B,) with a fastdae.nn.LPIPS `model` (which needs local VGG16 weights)."""
    _check_pair(x, y, "lpips_distance")
    return torch.cat([model(a, b).reshape(-1) for a, b in zip(x.split(batch_size), y.split(batch_size), strict=True)])
