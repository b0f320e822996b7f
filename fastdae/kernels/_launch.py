"""Kernel launches as data: what a launcher runs is what the static kernel report compiles.

Each launcher builds a `KernelLaunch` (kernel, runtime arguments, constexprs, candidate configs,
grid) in one function and hands it to `launch`; `fastdae.kernel_report` calls the same functions
with meta tensors and compiles every candidate for sm_90 / sm_80 without a GPU. So a block size,
an alignment flag or a precision can only change in one place.

Alignment: Triton proves 16-byte alignment of pointer arguments itself, but only divisibility by 16
*elements* of integer arguments, so a row stride of 72 (DiT-XL's head dim) or a (N, 8) row leaves
every load a 2-byte scalar. `align_elems` checks at launch what the kernels then assert with
`tl.multiple_of` (one `ALIGN` constexpr: 1 = no hint), so the hinted and unhinted kernels are one
source.

Per-architecture configs: a launcher picks its candidate list for the GPU it runs on (`arch_of`:
torch.cuda.get_device_capability as 90, 80, ...); the static report compiles the lists of other
GPUs by overriding that answer (`for_arch`), with meta tensors. Without CUDA (the interpreter) the
sm_90 lists are used.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from torch import Tensor

from fastdae.kernels._dispatch import triton_interpret

ALIGN_BYTES = 16  # one 128-bit load / cp.async / TMA element group
DEFAULT_ARCH = 90  # the config lists used without a CUDA device (interpreter tests, meta tensors)
_ARCH_OVERRIDE: contextvars.ContextVar[int | None] = contextvars.ContextVar("fastdae_arch", default=None)


def arch_of(t: Tensor) -> int:
    """The compute capability whose configs a launch on t's device uses, as 10 * major + minor."""
    override = _ARCH_OVERRIDE.get()
    if override is not None:
        return override
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return DEFAULT_ARCH


@contextlib.contextmanager
def for_arch(arch: int) -> Iterator[None]:
    """Launch builders inside pick the configs of `arch` (the static report: one target at a time)."""
    token = _ARCH_OVERRIDE.set(arch)
    try:
        yield
    finally:
        _ARCH_OVERRIDE.reset(token)


def num_warps_for(block_elems: int) -> int:
    """Warps per program from the number of elements one program touches per step."""
    if block_elems >= 16384:
        return 8
    if block_elems >= 2048:
        return 4
    return 2 if block_elems >= 256 else 1


@dataclass(frozen=True)
class LaunchConfig:
    """Block-size constexprs (name, value) plus warps and pipeline stages of one candidate."""

    meta: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict[str, int]:
        return dict(self.meta, num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: `launch` runs it, the static report compiles each of its configs.

    args: runtime arguments in the kernel's order (tensors, ints, floats); constexprs: the fixed
    compile-time values; configs: one, or the candidates autotuned on CUDA over `tune_key`
    (the interpreter runs the first); grid: block-size constexprs -> program grid."""

    kernel: Any  # triton JITFunction
    args: tuple
    constexprs: dict[str, Any]
    configs: tuple[LaunchConfig, ...]
    grid: Callable[[dict], tuple[int, ...]]
    tune_key: tuple[str, ...] = field(default=())
    # called with {argument name: value} | config meta before each launch (and each autotuning
    # trial): sets what depends on the config in the arguments, e.g. a TMA descriptor's block shape
    pre_hook: Callable[[dict], None] | None = None

    def named_args(self, meta: dict) -> dict:
        """The runtime arguments by name, plus the constexprs and a config's meta (a pre_hook's view)."""
        names = [n for n in self.kernel.arg_names if n not in self.constexprs and n not in meta]
        return {**dict(zip(names, self.args, strict=True)), **self.constexprs, **meta}

    @property
    def name(self) -> str:
        return self.kernel.__name__


def configs(options: Sequence[tuple[dict[str, int], int, int]]) -> tuple[LaunchConfig, ...]:
    """LaunchConfigs from (block constexprs, num_warps, num_stages) rows."""
    return tuple(LaunchConfig(tuple(sorted(m.items())), w, s) for m, w, s in options)


def strides(t: Tensor) -> tuple[int, ...]:
    """t's strides with 0 on size-1 dims (only index 0 is read there): what kernels and align_elems see."""
    return tuple(s if n > 1 else 0 for s, n in zip(t.stride(), t.shape, strict=True))


def align_elems(*tensors: Tensor) -> int:
    """ALIGN for the kernels: 16 bytes in elements when every tensor has a 16-byte aligned base, a
    unit last stride and all other `strides` multiples of 16 bytes (0 included), else 1 (no hint).

    All tensors must share one element size: the kernels hint every stride with the one ALIGN."""
    size = tensors[0].element_size()
    for t in tensors:
        *outer, last = strides(t)
        if t.element_size() != size or t.data_ptr() % ALIGN_BYTES or last not in (0, 1):
            return 1
        if any(s == 1 or (s * size) % ALIGN_BYTES for s in outer):  # a unit outer stride: a transposed view
            return 1
    return ALIGN_BYTES // size


@functools.cache
def _autotuner(kernel, candidates: tuple[LaunchConfig, ...], key: tuple[str, ...], pre_hook):
    """The kernel wrapped in an autotuner over its candidates; tunes once per key value (and dtypes)."""
    cfgs = [
        triton.Config(dict(c.meta), num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=pre_hook)
        for c in candidates
    ]
    return triton.autotune(configs=cfgs, key=list(key))(kernel)


def launch(plan: KernelLaunch) -> None:
    """Run the launch: autotuned over its configs on CUDA when there are several, else the first."""
    if len(plan.configs) > 1 and not triton_interpret():
        tuner = _autotuner(plan.kernel, plan.configs, plan.tune_key, plan.pre_hook)
        tuner[plan.grid](*plan.args, **plan.constexprs)
        return
    cfg = plan.configs[0]
    if plan.pre_hook is not None:
        plan.pre_hook(plan.named_args(dict(cfg.meta)))
    plan.kernel[plan.grid(dict(cfg.meta))](*plan.args, **plan.constexprs, **cfg.kwargs())
