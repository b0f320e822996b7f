"""The one place that turns `impl=` into a backend (resolve_impl) and a route to the op (route), and
the one launch heuristic helper.

auto: Triton for CUDA tensors, the C++ op for CPU tensors when it is built, else the op's fallback
(the reference; for attention, torch's SDPA).
The Triton interpreter (TRITON_INTERPRET=1) lets impl="triton" run on CPU tensors: that is for
tests, never a user's fast path.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from fastdae import _ext

Impl = Literal["auto", "triton", "cpp", "ref"]
BASE_IMPLS = ("auto", "triton", "cpp", "ref")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(
    impl: str,
    device: torch.device,
    op: str,
    cpp: str | None = None,
    extra: tuple[str, ...] = (),
    fallback: str = "ref",
) -> str:
    """Validate `impl` for an op on `device` and resolve "auto".

    cpp: the csrc stem of the op's C++ CPU kernel, or None when it has none.
    extra: op-specific backends beyond the base four (e.g. "sdpa", "xformers" for attention).
    fallback: what "auto" picks when neither Triton (CUDA) nor the C++ op (CPU) applies; the
    reference, unless a measured-faster torch op exists (attention: SDPA's CPU kernel).
    """
    allowed = BASE_IMPLS + extra
    if impl not in allowed:
        raise ValueError(f"{op}: impl must be one of {allowed}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and cpp is not None and _ext.available(cpp):
            return "cpp"
        return fallback
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
    return impl


def route(impl: str, device: torch.device, op: str, cpp: str | None = None) -> str:
    """Where a call goes, above the one op per capability (kernels/_common.py):
    "ref"        impl="ref": the reference itself, no op;
    "op"         impl="auto", "cpp" or "triton" on CUDA: the op, whose kernel follows the device
                 (CUDA: Triton; CPU: C++ once csrc/<cpp>.cpp is loaded, else the reference);
    "interpret"  impl="triton" on CPU tensors under TRITON_INTERPRET=1 (tests only): the launcher
                 beside the op, with the op's autograd formula.
    Raises, as resolve_impl does, when the asked-for backend is missing."""
    backend = resolve_impl(impl, device, op, cpp=cpp)
    if impl == "ref":
        return "ref"
    return "interpret" if backend == "triton" and device.type != "cuda" else "op"


def num_warps_for(block_elems: int) -> int:
    """Warps per program from the number of elements one program touches per step."""
    if block_elems >= 16384:
        return 8
    if block_elems >= 2048:
        return 4
    return 2 if block_elems >= 256 else 1
