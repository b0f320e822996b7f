"""Lazy exports for package `__init__`s: names resolve to their defining module on first use, so
importing a package loads no kernels, compilers or third-party libraries until a name is touched.

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"attention": "fastdae.kernels.attention"})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], submodules: tuple[str, ...] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """(`__getattr__`, `__dir__`, `__all__`) for `package`: each name in `exports` is the attribute of
    the same name in the module it maps to; each of `submodules` is `package.<name>`."""
    names = sorted([*exports, *submodules])

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # resolved once
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__, names
