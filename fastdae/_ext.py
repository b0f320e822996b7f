"""Lazy loader of fastdae's C++ CPU kernels (csrc/*.cpp). Each file registers the CPU kernels of
`fastdae::` ops whose schemas are defined in Python (fastdae/kernels/_common.py): loading it is what
turns the op's CPU kernel from the pure-torch reference into the C++ function (csrc/README.md).

Order of attempts, once per process:
  1. a prebuilt library (`fastdae/_C*.so`, from FASTDAE_BUILD_EXT=1 at install time);
  2. a JIT build of each csrc file with ninja through torch.utils.cpp_extension, cached in a
     directory keyed by the source hash, torch version and flags (so edits rebuild, reuse is free);
  3. nothing: one warning per source file, and the ops fall back to the pure-torch reference.
FASTDAE_NO_EXT=1 skips 1 and 2. FASTDAE_EXT_DIR overrides the cache root (default
~/.cache/fastdae/ext). Each csrc file builds alone so one broken op never disables the others.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast"]
_LDFLAGS = ["-fopenmp"]
_PKG = Path(__file__).resolve().parent


def _source_dir() -> Path:
    """csrc/ of a source checkout, else the copy shipped inside the package by setup.py."""
    for cand in (_PKG.parent / "csrc", _PKG / "_csrc"):
        if cand.is_dir() and any(cand.glob("*.cpp")):
            return cand
    return _PKG.parent / "csrc"


def _cache_root() -> Path:
    return Path(os.environ.get("FASTDAE_EXT_DIR", Path.home() / ".cache" / "fastdae" / "ext"))


@functools.cache
def _load_prebuilt() -> bool:
    libs = sorted(_PKG.glob("_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
        return True
    except (OSError, RuntimeError) as err:
        warnings.warn(
            f"fastdae: prebuilt C++ ops {libs[0].name} failed to load ({err}); trying a JIT build", stacklevel=2
        )
        return False


@functools.cache
def _load_source(stem: str) -> bool:
    """JIT-build csrc/<stem>.cpp (cached) and load it; False with one warning on failure."""
    src = _source_dir() / f"{stem}.cpp"
    if not src.is_file():
        return False
    key = hashlib.sha256(src.read_bytes() + torch.__version__.encode() + " ".join(_CFLAGS).encode())
    name = f"fastdae_{stem}_{key.hexdigest()[:12]}"
    build_dir = _cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=name,
            sources=[str(src)],
            build_directory=str(build_dir),
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            is_python_module=False,
            verbose=os.environ.get("FASTDAE_EXT_VERBOSE") == "1",
        )
        return True
    except Exception as err:  # compiler missing, ninja missing, compile error: fall back, loudly once
        msg = str(err).strip().splitlines()
        warnings.warn(
            f"fastdae: could not build the C++ op file {src.name} ({msg[-1] if msg else type(err).__name__}); "
            "using the pure-torch reference on CPU. Set FASTDAE_EXT_VERBOSE=1 to see the build log, "
            "or FASTDAE_NO_EXT=1 to skip the build.",
            stacklevel=2,
        )
        return False


def available(stem: str) -> bool:
    """True when csrc/<stem>.cpp is loaded (prebuilt or JIT-built): its ops' CPU kernels are C++."""
    if os.environ.get("FASTDAE_NO_EXT") == "1" or sys.platform == "win32":
        return False
    return _load_prebuilt() or _load_source(stem)


def require(stem: str, op: str) -> None:
    """A RuntimeError that says why the C++ kernels of csrc/<stem>.cpp are missing, if they are."""
    if not available(stem):
        raise RuntimeError(
            f"{op}: impl='cpp' needs the C++ kernels of csrc/{stem}.cpp, which are unavailable (FASTDAE_NO_EXT=1, "
            "or the build failed: see the warning above); use impl='auto' (the reference on CPU then) or 'ref'"
        )
