"""fastdae: Decoupled Autoencoders (Hu et al., NeurIPS 2023, arXiv 2307.08283) with fused kernels.

Public API (resolved lazily, so `import fastdae` stays cheap and never touches Triton or a compiler):
  training   train, TrainConfig, Result, LatentCache
  evaluation sample (N samples of a run -> ADM .npz), fid (folders / .npz, local Inception weights)
  kernels    vq_nearest, vector_quantize, VQOutput, attention, lpips_head
  modules    fastdae.nn.{VectorQuantizer, Attention, LPIPS}
  packages   nn, models, metrics, integrations
"""

from __future__ import annotations

import importlib
from typing import Any

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
    "fid": "fastdae.fid_score",
}
_SUBMODULES = (
    "nn",
    "models",
    "metrics",
    "integrations",
    "kernels",
    "config",
    "data",
    "cache",
    "training",
    "evaluation",
    "sampling",
    "fid_score",
)

__all__ = sorted([*_EXPORTS, "nn", "models", "metrics", "integrations", "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fastdae.{name}")
    raise AttributeError(f"module 'fastdae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
