"""Drop-in nn.Modules over fastdae's ops, for use in any codebase.

from fastdae.nn import VectorQuantizer, Attention, LPIPS
"""

from __future__ import annotations

from fastdae._lazy import lazy_exports

_EXPORTS = {
    "VectorQuantizer": "fastdae.nn.quantizer",
    "Attention": "fastdae.nn.attention",
    "LPIPS": "fastdae.nn.lpips",
    "VGG16Trunk": "fastdae.nn.lpips",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
