"""The one place that turns `impl=` into a route to an op: `route`, which every public op calls.

auto: Triton for CUDA tensors (when the kernel takes the inputs), the C++ op for CPU tensors when it
is built, else the op's fallback (the reference; for attention, torch's SDPA).
The Triton interpreter (TRITON_INTERPRET=1) lets impl="triton" run on CPU tensors: that is for
tests, never a user's fast path.
"""

from __future__ import annotations

import os

import torch

from fastdae import _ext

BASE_IMPLS = ("auto", "triton", "cpp", "ref")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(impl: str, device: torch.device, op: str, cpp: str | None, extra: tuple[str, ...]) -> None:
    """Raise when `impl` is not a backend of the op, or the asked-for backend is missing here."""
    allowed = BASE_IMPLS + extra
    if impl not in allowed:
        raise ValueError(f"{op}: impl must be one of {allowed}, got {impl!r}")
    if impl == "triton" and device.type != "cuda" and not triton_interpret():
        raise RuntimeError(
            f"{op}: impl='triton' needs CUDA tensors (got {device.type}); "
            "on CPU use impl='cpp' or 'ref', or set TRITON_INTERPRET=1 before importing fastdae to test kernels"
        )
    if impl == "cpp":
        if cpp is None:
            raise ValueError(f"{op}: has no C++ implementation; use impl='auto', 'triton' or 'ref'")
        if device.type != "cpu":
            raise RuntimeError(f"{op}: impl='cpp' runs on CPU tensors only (got {device.type})")
        _ext.require(cpp, op)  # raises with the reason when unavailable


def route(
    impl: str,
    device: torch.device,
    op: str,
    cpp: str | None = None,
    extra: tuple[str, ...] = (),
    fallback: str = "op",
    unsupported: str | None = None,
) -> str:
    """Where a call goes, above the one op per capability (kernels/_common.py):
    "ref"        impl="ref": the reference itself, no op;
    "op"         impl="auto", "cpp" or "triton" on CUDA: the op, whose kernel follows the device
                 (CUDA: Triton; CPU: C++ once csrc/<cpp>.cpp is loaded, else the reference);
    "interpret"  impl="triton" on CPU tensors under TRITON_INTERPRET=1 (tests only): the launcher
                 beside the op, with the op's autograd formula;
    an `extra`   an op-specific backend asked for by name (attention: "sdpa", "xformers"), or the
                 `fallback` that impl="auto" takes where the op's kernels do not serve the call.

    cpp: the csrc stem of the op's C++ CPU kernel, or None when it has none (auto on CPU then goes
    to `fallback`: "op", whose CPU kernel is the reference, unless a measured-faster torch path
    exists). unsupported: why the Triton kernel cannot take these inputs (None: it can); auto on
    CUDA then goes to `fallback`, impl="triton" raises ValueError with the reason.
    Raises when the asked-for backend is missing."""
    _check(impl, device, op, cpp, extra)
    if impl == "ref":
        return "ref"
    if impl in extra:
        return impl
    if impl == "auto" and device.type == "cuda":
        return fallback if unsupported is not None else "op"
    if impl == "auto":
        return "op" if cpp is not None and _ext.available(cpp) else fallback
    if impl == "triton" and unsupported is not None:
        raise ValueError(f"{op}: {unsupported}")
    return "interpret" if impl == "triton" and device.type != "cuda" else "op"
