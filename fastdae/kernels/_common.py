"""The preamble every kernel module shares (vq.py, attention.py, lpips.py): the dtypes the kernels
take, the Triton dot helper and its precision choice, the device guard, one tensor check, and how a
capability becomes one op.

One op per capability (torchao style): `define_op` defines the schema once, here in Python, in the
`fastdae` namespace, and registers its kernels by dispatch key:

    CUDA                       the Triton launcher;
    CPU                        the C++ function of csrc/<stem>.cpp (`TORCH_LIBRARY_IMPL(fastdae, CPU, m)`;
                               the C++ file holds no schema), once fastdae/_ext.py has loaded it;
    CompositeExplicitAutograd  the pure-torch reference: the kernel of every device without its own,
                               so the CPU's when the C++ extension is unavailable (FASTDAE_NO_EXT=1,
                               a failed build);

plus a fake (shapes only, for torch.compile and opcheck) and the autograd formula. `impl=` is chosen
above the op (kernels/_dispatch.py: route): "ref" calls the reference itself; "auto", "cpp" and
"triton" call the op after checking that the asked-for backend exists; "triton" on CPU tensors under
TRITON_INTERPRET=1 (tests only) runs the launcher beside the op through `interpreted`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdae.kernels._dispatch import triton_interpret

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton and C++ kernels take
LIB = torch.library.Library("fastdae", "FRAGMENT")  # owns every fastdae:: schema and Python kernel


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc, may be None) with fp32 accumulation. PRECISION "upcast" is for the interpreter
    only: its bf16 dot multiplies the raw bits as integers (Triton 3.9), so operands are widened to
    fp32 first, which gives the same exact products as a bf16 tensor-core dot."""
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


def precision(dtype: torch.dtype, fp32: str) -> str:
    """The PRECISION of `dot` for operands of `dtype`: `fp32` for float32 (each kernel's accuracy
    choice, e.g. "ieee" or "3xtf32"); "upcast" for bfloat16 under the interpreter; else "tf32",
    which is moot for 16-bit operands."""
    if dtype == torch.float32:
        return fp32
    return "upcast" if dtype == torch.bfloat16 and triton_interpret() else "tf32"


def on_device(t: Tensor):
    """Launch on t's GPU: Triton launches on the current CUDA device, not on its tensors'."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_tensors(op: str, named: Mapping[str, Tensor], dtypes: tuple[torch.dtype, ...]) -> None:
    """The public boundary's tensor check: every value of `named` (argument name -> value) is a
    tensor (TypeError), the first has a dtype in `dtypes` and the others share it (TypeError), and
    all share its device (ValueError). Shapes are each op's own."""
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    (first, ref), *rest = named.items()
    if ref.dtype not in dtypes:
        raise TypeError(f"{op}: {first} must have a dtype in {dtypes}, got {ref.dtype}")
    for name, t in rest:
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{op}: {name} must have {first}'s dtype {ref.dtype}, got {t.dtype} (cast it with .to({ref.dtype}))"
            )
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {ref.device}")


def define_op(
    schema: str,
    *,
    cuda: Callable,
    reference: Callable,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
):
    """Define fastdae::<schema> once and register its CUDA (Triton), default (reference), fake and
    autograd kernels; the CPU kernel comes from csrc. Returns the op (an OpOverload)."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, cuda, "CUDA")
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastdae::{name}", fake, lib=LIB)
    if backward is not None:
        torch.library.register_autograd(f"fastdae::{name}", backward, setup_context=setup_context, lib=LIB)
    return getattr(torch.ops.fastdae, name).default


def define_op_pair(
    forward: tuple[str, Callable, Callable, Callable],
    backward: tuple[str, Callable, Callable, Callable],
    *,
    autograd: Callable,
    setup_context: Callable,
):
    """A forward op whose gradient is an op of its own, each given as (schema, cuda, reference, fake)
    kernels of define_op; the forward's autograd formula `autograd` calls the backward op.
    Returns (forward op, backward op)."""
    schema, cuda, reference, fake = forward
    fwd = define_op(schema, cuda=cuda, reference=reference, fake=fake, backward=autograd, setup_context=setup_context)
    schema, cuda, reference, fake = backward
    return fwd, define_op(schema, cuda=cuda, reference=reference, fake=fake)


def interpreted(forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """forward (an op's Triton launcher) with the op's autograd formula, as a function, for CPU
    tensors under TRITON_INTERPRET=1: the op's CPU kernel is C++ or the reference, so the interpreter
    (tests only) runs beside the op instead of through it. Not traceable by torch.compile."""
    fn: Any = type(  # a torch.autograd.Function subclass, made at run time
        "Interpreted",
        (torch.autograd.Function,),
        dict(forward=staticmethod(forward), setup_context=staticmethod(setup_context), backward=staticmethod(backward)),
    )
    return fn.apply
