"""Lazy loader of fastdae's C++ CPU kernels (csrc/*.cpp). Each file registers the CPU kernels of
`fastdae::` ops whose schemas are defined in Python (fastdae/kernels/_common.py): loading it is what
turns the op's CPU kernel from the pure-torch reference into the C++ function (csrc/README.md).

Order of attempts, once per process:
  1. a prebuilt library (`fastdae/_C*.so`, from FASTDAE_BUILD_EXT=1 at install time);
  2. a JIT build of each csrc file with ninja through torch.utils.cpp_extension, cached in a
     directory keyed by the sources (the .cpp and the csrc headers), the torch version and the
     flags, which name the instruction set compiled for (`ISA_FLAGS`: a portable baseline; the hot
     loops pick AVX2 / AVX-512 / AMX at run time), so one cache serves every CPU of a cluster;
  3. nothing: one warning per source file, and the ops fall back to the pure-torch reference.
FASTDAE_NO_EXT=1 skips 1 and 2. FASTDAE_EXT_DIR overrides the cache root (default
~/.cache/fastdae/ext). Each csrc file builds alone so one broken op never disables the others.

Building and loading a cache entry happen under an flock on `<entry>/fastdae.lock`: the OS releases
it when its holder dies, so a process killed mid-build never blocks the next one (torch's own file
baton, `<entry>/lock`, would: it is a plain file that only its holder deletes). A waiter gives up
after FASTDAE_EXT_LOCK_TIMEOUT seconds (default 900) with a warning naming the holder, and the ops
use the reference. An entry whose library is already built is loaded directly, without the baton.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fastdae import files

# The instruction set the C++ files are compiled for: a portable baseline, never -march=native
# (a cache shared by machines with different CPUs would hand an AVX-512 library to an AVX2 node:
# SIGILL). csrc/cpu_dispatch.h compiles the hot loops a second and third time for AVX2 and AVX-512
# (+ AVX512-BF16 / AMX) and picks one per call from the CPU's cpuid.
ISA_FLAGS = ["-march=x86-64", "-mtune=generic"] if platform.machine() in ("x86_64", "AMD64") else []
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", *ISA_FLAGS]
_LDFLAGS = ["-fopenmp"]
_PKG = Path(__file__).resolve().parent
LOCK_NAME = "fastdae.lock"  # ours (flock); torch's baton is "lock"
_BATON_NAME = "lock"


class ExtLockTimeout(RuntimeError):
    """Another process held a cache entry's build lock for longer than the timeout."""


def _source_dir() -> Path:
    """csrc/ of a source checkout, else the copy shipped inside the package by setup.py."""
    for cand in (_PKG.parent / "csrc", _PKG / "_csrc"):
        if cand.is_dir() and any(cand.glob("*.cpp")):
            return cand
    return _PKG.parent / "csrc"


def _cache_root() -> Path:
    return Path(os.environ.get("FASTDAE_EXT_DIR", Path.home() / ".cache" / "fastdae" / "ext"))


def _lock_timeout() -> float:
    raw = os.environ.get("FASTDAE_EXT_LOCK_TIMEOUT", "900")
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"FASTDAE_EXT_LOCK_TIMEOUT must be a number of seconds, got {raw!r}") from None


def cache_key(src: Path, flags: list[str] | None = None) -> str:
    """12 hex digits of sha256(the .cpp, every csrc header, the torch version, the compile flags).
    The flags carry the instruction set compiled for (ISA_FLAGS), never the host's: the key and
    the library are the same on every CPU."""
    h = hashlib.sha256(src.read_bytes())
    for header in sorted(src.parent.glob("*.h")):
        h.update(header.name.encode() + header.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(_CFLAGS if flags is None else flags).encode())
    return h.hexdigest()[:12]


def entry_name(stem: str) -> str:
    """The cache entry (directory and library name) of csrc/<stem>.cpp."""
    return f"fastdae_{stem}_{cache_key(_source_dir() / f'{stem}.cpp')}"


@contextmanager
def build_lock(directory: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock on directory/fastdae.lock (fastdae.files.exclusive_lock), released by the OS if
    this process dies. Waits at most `timeout` seconds, then raises ExtLockTimeout naming the holder's pid."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME

    def busy(pid: str) -> str:
        return (
            f"{path} is held by pid {pid or 'unknown'} (building or loading the C++ ops) for more than "
            f"{timeout:g} s (FASTDAE_EXT_LOCK_TIMEOUT)"
        )

    with files.exclusive_lock(path, busy, timeout, ExtLockTimeout):
        yield


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


def _build(src: Path, name: str, build_dir: Path) -> None:
    """ninja build + load through torch, under our flock. Only a dead process can have left torch's
    baton (we hold the lock every fastdae build takes), so it is removed first: else torch waits on it."""
    from torch.utils import cpp_extension

    (build_dir / _BATON_NAME).unlink(missing_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(src)],
        build_directory=str(build_dir),
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        extra_include_paths=[str(src.parent)],
        is_python_module=False,
        verbose=os.environ.get("FASTDAE_EXT_VERBOSE") == "1",
    )


@functools.cache
def _load_source(stem: str) -> bool:
    """Load csrc/<stem>.cpp's cached library, building it first if needed; False with one warning on failure."""
    src = _source_dir() / f"{stem}.cpp"
    if not src.is_file():
        return False
    name = entry_name(stem)
    build_dir = _cache_root() / name
    lib = build_dir / f"{name}.so"
    try:
        with build_lock(build_dir, _lock_timeout()):
            if lib.is_file():
                try:
                    torch.ops.load_library(str(lib))
                    return True
                except (OSError, RuntimeError):  # a library cut short by a killed linker: rebuild it
                    lib.unlink(missing_ok=True)
            _build(src, name, build_dir)
        return True
    except Exception as err:  # compiler missing, ninja missing, compile error, lock timeout: fall back, loudly once
        msg = str(err).strip().splitlines()
        warnings.warn(
            f"fastdae: could not build or load the C++ op file {src.name} ({msg[-1] if msg else type(err).__name__}); "
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


def cpu_isa() -> str:
    """The instruction set the C++ nearest-code search runs on this CPU ("generic", "avx2", "avx512",
    "avx512bf16" or "amx"; FASTDAE_CPU_ISA caps it), or "" when the C++ ops are not loaded."""
    if not available("vq"):
        return ""
    return str(torch.ops.fastdae_cpu.isa())


def require(stem: str, op: str) -> None:
    """A RuntimeError that says why the C++ kernels of csrc/<stem>.cpp are missing, if they are."""
    if not available(stem):
        raise RuntimeError(
            f"{op}: impl='cpp' needs the C++ kernels of csrc/{stem}.cpp, which are unavailable (FASTDAE_NO_EXT=1, "
            "or the build failed: see the warning above); use impl='auto' (the reference on CPU then) or 'ref'"
        )
