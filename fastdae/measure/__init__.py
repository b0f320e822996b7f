"""Measurements for the DAE comparison (docs/paper.md §1, §5): pure functions of tensors and callables.

Images are (B, 3, H, W) in [-1, 1]; decoders are callables latents (B, C, h, w) -> images.

    psnr(x, y), ssim(x, y)                        # (B,) each, float64
    lpips_distance(x, y, model)                   # (B,) with a fastdae.nn.LPIPS (needs local VGG weights)
    frechet_distance(feats_a, feats_b)            # float; also takes (mu, sigma) pairs
    frechet_score(extractor, images_a, images_b)  # FID with FIDInceptionV3, else "FD-feat" (frechet_name)
    sample_validity(classifier, samples, labels)  # validity rate and class accuracy of samples
    dec, z = scale_normalize(decoder, latents)    # the complexity probes below run on these
    lipschitz_lower_bound(dec, z), jacobian_spectral_norm(dec, z), jacobian_frobenius_hutchinson(dec, z)
    width, family = minimal_capacity(make_decoder, z, images, widths, target_error, steps)
    penalised_distance(family, z, images, extractor, lam)    # D(P_z, P_x) of docs/paper.md §1

Measurement lives here, below the trainer: images.py, distribution.py and complexity.py (pure
functions, re-exported here), fid.py (`fastdae.fid`: FID between folders / .npz files), judge.py (the
classifier every run's samples are scored by), stats.py (Student-t intervals, Welch's t-test).
"""

from fastdae.measure.complexity import (
    COMPLEXITIES,
    FittedDecoder,
    decoder_complexity,
    fit_decoder,
    jacobian_frobenius_hutchinson,
    jacobian_spectral_norm,
    lipschitz_lower_bound,
    minimal_capacity,
    penalised_distance,
    scale_normalize,
)
from fastdae.measure.distribution import (
    extract_features,
    frechet_distance,
    frechet_name,
    frechet_score,
    gaussian_stats,
    sample_validity,
)
from fastdae.measure.images import (
    DATA_RANGE,
    VALIDITY_THRESHOLD,
    Decoder,
    FeatureExtractor,
    GaussianStats,
    lpips_distance,
    psnr,
    ssim,
)

__all__ = [
    "COMPLEXITIES",
    "DATA_RANGE",
    "Decoder",
    "FeatureExtractor",
    "FittedDecoder",
    "GaussianStats",
    "VALIDITY_THRESHOLD",
    "decoder_complexity",
    "extract_features",
    "fit_decoder",
    "frechet_distance",
    "frechet_name",
    "frechet_score",
    "gaussian_stats",
    "jacobian_frobenius_hutchinson",
    "jacobian_spectral_norm",
    "lipschitz_lower_bound",
    "lpips_distance",
    "minimal_capacity",
    "penalised_distance",
    "psnr",
    "sample_validity",
    "scale_normalize",
    "ssim",
]
