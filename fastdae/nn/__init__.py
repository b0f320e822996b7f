"""Drop-in nn.Modules over fastdae's ops, for use in any codebase.

from fastdae.nn import VectorQuantizer, Attention, LPIPS
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VectorQuantizer": "fastdae.nn.quantizer",
    "Attention": "fastdae.nn.attention",
    "LPIPS": "fastdae.nn.lpips",
    "VGG16Trunk": "fastdae.nn.lpips",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastdae.nn' has no attribute {name!r}")
