"""fastdae: Decoupled Autoencoders (Hu et al., NeurIPS 2023, arXiv 2307.08283) with fused kernels.

Public API (resolved lazily, so `import fastdae` stays cheap and never touches Triton or a compiler):
  training   train, TrainConfig, Result, LatentCache
  evaluation sample (N samples of a run -> ADM .npz), fid (folders / .npz, local Inception weights)
  kernels    vq_nearest, vector_quantize, VQOutput, attention, lpips_head
  modules    fastdae.nn.{VectorQuantizer, Attention, LPIPS}
  packages   nn, models, measure, integrations
"""

from __future__ import annotations

from fastdae._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "train": "fastdae.training",
    "TrainConfig": "fastdae.config",
    "Result": "fastdae.training",
    "LatentCache": "fastdae.cache",
    "vq_nearest": "fastdae.kernels.vq",
    "vector_quantize": "fastdae.kernels.vq",
    "VQOutput": "fastdae.kernels.vq",
    "attention": "fastdae.kernels.attention",
    "lpips_head": "fastdae.kernels.lpips",
    "sample": "fastdae.sampling",
    "fid": "fastdae.measure.fid",
}
_SUBMODULES = (
    "nn",
    "models",
    "measure",
    "integrations",
    "pretrained",
    "kernels",
    "config",
    "data",
    "cache",
    "training",
    "evaluation",
    "sampling",
)

__getattr__, __dir__, _names = lazy_exports(__name__, _EXPORTS, _SUBMODULES)
__all__ = [*_names, "__version__"]
