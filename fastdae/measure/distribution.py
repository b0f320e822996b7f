"""Distribution metrics: the Fréchet distance between Gaussian fits of features (FID with
FIDInceptionV3, else "FD-feat" of a classifier's features) and the validity of samples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastdae.measure.images import (
    VALIDITY_THRESHOLD,
    FeatureExtractor,
    GaussianStats,
    _batched,
    _device_of,
    _eval_mode,
)


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------
def gaussian_stats(feats: Tensor) -> GaussianStats:
    """(N, D) features -> float64 mean (D,) and unbiased covariance (D, D) (as pytorch-fid's np.cov)."""
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"gaussian_stats: features must be (N, D) with N >= 2, got {tuple(feats.shape)}")
    f = feats.detach().double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(s: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix by eigendecomposition; eigenvalues below 0 (rounding) -> 0."""
    evals, evecs = torch.linalg.eigh((s + s.T) / 2)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(a: Tensor | GaussianStats, b: Tensor | GaussianStats) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (each (N, D), or (mu, sigma)):

        FD = ||mu_a - mu_b||^2 + tr S_a + tr S_b - 2 tr (S_a^1/2 S_b S_a^1/2)^1/2

    (the squared 2-Wasserstein distance of the Gaussians). The matrix square root is taken on
    symmetric PSD matrices by eigendecomposition in float64, so it is real and stable when a
    covariance is singular (fewer samples than dimensions); tiny negative eigenvalues from rounding
    are clamped to 0, and so is a result of -1e-12."""
    mu_a, s_a = a if isinstance(a, tuple) else gaussian_stats(a)
    mu_b, s_b = b if isinstance(b, tuple) else gaussian_stats(b)
    mu_a, s_a, mu_b, s_b = (t.double() for t in (mu_a, s_a, mu_b, s_b))
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or s_a.shape != (d, d) or s_b.shape != (d, d):
        raise ValueError(
            f"frechet_distance: means must be (D,) and covariances (D, D) with one D, got "
            f"{tuple(mu_a.shape)}, {tuple(s_a.shape)}, {tuple(mu_b.shape)}, {tuple(s_b.shape)}"
        )
    root_a = _psd_sqrt(s_a)
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a)  # eigenvalues of S_a^1/2 S_b S_a^1/2 (PSD)
    tr_sqrt = cross.clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt
    return max(fd.item(), 0.0)


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 128) -> Tensor:
    """Features (N, D) float64 of images (N, 3, H, W), in batches, with modules in eval mode."""
    if images.dim() != 4:
        raise ValueError(f"extract_features: images must be (N, C, H, W), got {tuple(images.shape)}")
    device = _device_of(extractor, images)
    with _eval_mode(extractor):
        return _batched(lambda t: extractor(t.to(device)).double().cpu(), images, batch_size)


def frechet_name(extractor: FeatureExtractor, reconstruction: bool = False) -> str:
    """What a Fréchet score in this feature space is called: "FID" only for the FID Inception-v3;
    any other extractor (e.g. fastdae's classifier) gives "FD-feat". Reconstructions prefix "r"."""
    from fastdae.models.inception import FIDInceptionV3

    name = "FID" if isinstance(extractor, FIDInceptionV3) else "FD-feat"
    return "r" + name if reconstruction else name


def frechet_score(
    extractor: FeatureExtractor,
    images_a: Tensor | GaussianStats,
    images_b: Tensor | GaussianStats,
    batch_size: int = 128,
) -> float:
    """Fréchet distance between two image sets in the extractor's feature space (see frechet_name).
    Either side may be precomputed `gaussian_stats` (e.g. of the real images, reused across arms).
    Generated vs real samples: FID / FD-feat; reconstructions vs their originals: rFID / rFD-feat."""

    def stats(x: Tensor | GaussianStats) -> GaussianStats:
        return x if isinstance(x, tuple) else gaussian_stats(extract_features(extractor, x, batch_size))

    return frechet_distance(stats(images_a), stats(images_b))


# ---------------------------------------------------------------------------------------------
# Samples of the procedural dataset
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_validity(
    classifier: nn.Module,
    samples: Tensor,
    labels: Tensor | None = None,
    threshold: float = VALIDITY_THRESHOLD,
    batch_size: int = 256,
) -> dict[str, float | None]:
    """Judge generated images with a classifier trained on real data (fastdae.models.classifier).

    validity: the fraction of samples the classifier assigns to some class with softmax probability
        >= `threshold`, i.e. samples that look like a recognisable shape (compare with the same rate
        on real images, which the comparison reports as the ceiling).
    class_accuracy: for class-conditional samples (`labels` (N,) = the classes asked for), the
        fraction whose argmax class is the class asked for, with no threshold; None without labels."""
    if labels is not None and labels.shape != (samples.shape[0],):
        raise ValueError(f"sample_validity: labels must be ({samples.shape[0]},), got {tuple(labels.shape)}")
    device = _device_of(classifier, samples)
    with _eval_mode(classifier):
        probs = _batched(lambda t: classifier(t.to(device)).softmax(1).cpu(), samples, batch_size)  # (N, K)
    conf, pred = probs.max(1)
    return {
        "validity": (conf >= threshold).double().mean().item(),
        "class_accuracy": None if labels is None else (pred == labels.cpu()).double().mean().item(),
    }
