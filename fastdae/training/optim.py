"""Optimisation pieces every stage uses: `Updater` (optimizer, LR schedule, fp16 GradScaler and
gradient accumulation of one module: the only place these live), EMA of weights, and the NaN/Inf guard.

A step of a stage loop, whatever the options:

    for part in upd.micro_batches(batch, model_train):   # grad_accum equal parts of the batch
        loss = ...(part)
        upd.backward(loss)                               # (scaled) loss / grad_accum
    terms = upd.logged_step()                            # unscale -> clip -> step -> schedule
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastdae.training.distributed import Dist, unwrap

Scheduler = torch.optim.lr_scheduler.LambdaLR


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; the run stopped without writing a checkpoint after it."""


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """The multiplier of the base lr at (0-based) `step`: linear warm-up (step + 1) / warmup_steps over
    the first warmup_steps, then 1 ("constant") or half a cosine from 1 to 0 at total_steps ("cosine")."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def mean_terms(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-key mean of a step's micro-batch loss terms (tensors or floats)."""
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


def split_batch(batch: Any, parts: int) -> list[Any]:
    """A batch (a tensor, or dicts/tuples/lists of tensors, all (B, ...)) as `parts` batches of B / parts."""
    if isinstance(batch, Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        split = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        columns = [split_batch(v, parts) for v in batch]
        return [type(batch)(v[i] for v in columns) for i in range(parts)]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


class Updater:
    """The optimisation of one module's parameters, configured by a stage config `s` (lr, optimizer,
    weight_decay, warmup_steps, lr_schedule, grad_accum, grad_clip, fused; docs/training.md: training options):
    Adam or AdamW, the LR schedule over `total_steps`, a GradScaler (enabled with fp16 autocast: the
    loss is scaled so fp16 gradients do not underflow; steps with Inf/NaN gradients are skipped and
    the scale lowered), and gradient accumulation over `grad_accum` micro-batches per step.
    A checkpoint holds all three states (`state_dict`); an optimizer step only ever happens at the
    end of a whole step, so checkpoints (between steps) never split an accumulation."""

    def __init__(
        self,
        params: Iterable[Tensor],
        s: Any,
        *,
        total_steps: int,
        fp16: bool,
        device: torch.device,
        lr: float | None = None,
        betas: tuple[float, float] | list[float] | None = None,
        optimizer: str | None = None,
        schedule: str | None = None,
        warmup_steps: int | None = None,
    ) -> None:
        """Keyword overrides (the discriminator: its own lr, Adam, constant, no warm-up) replace s's values."""
        self.params = list(params)
        self.grad_clip, self.grad_accum = s.grad_clip, s.grad_accum
        kind = optimizer or s.optimizer
        opt_cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        weight_decay = s.weight_decay if optimizer is None else 0.0
        self.opt = opt_cls(
            self.params,
            lr=lr or s.lr,
            betas=tuple(betas or s.betas),
            weight_decay=weight_decay,
            fused=True if s.fused else None,
        )  # None: torch's default (loop on CPU, foreach on CUDA)
        self.sched = Scheduler(
            self.opt,
            partial(
                lr_factor,
                warmup_steps=s.warmup_steps if warmup_steps is None else warmup_steps,
                schedule=schedule or s.lr_schedule,
                total_steps=total_steps,
            ),
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self._parts = 0
        self._terms: list[dict[str, Tensor]] = []  # this step's micro-batches' loss terms (backward)
        self._outputs: list[Tensor] = []  # and their outputs, when given

    def micro_batches(self, batch: Any, *ddp_modules: nn.Module) -> Iterator[Any]:
        """The step's batch in grad_accum equal parts; under DDP the gradient all-reduce of
        `ddp_modules` runs only in the last part's backward (no_sync before)."""
        parts = split_batch(batch, self.grad_accum)
        for i, part in enumerate(parts):
            with contextlib.ExitStack() as stack:
                if i < len(parts) - 1:
                    for m in ddp_modules:
                        m = getattr(m, "_orig_mod", m)  # a torch.compile'd DDP module
                        if isinstance(m, nn.parallel.DistributedDataParallel):
                            stack.enter_context(m.no_sync())
                yield part

    def backward(self, loss: Tensor, terms: dict[str, Tensor] | None = None, output: Tensor | None = None) -> None:
        """Add d(loss / grad_accum)/dparams (fp16: scaled) to the gradients; the first part of a step
        starts from zero (other losses' backward may have reached these parameters, e.g. the
        generator's loss through the discriminator). The loss and its `terms` are kept (detached) for
        the step's log (logged_step), the micro-batch's `output` for `output`."""
        if self._parts == 0:
            self.opt.zero_grad(set_to_none=True)
            self._terms, self._outputs = [], []
        self._parts += 1
        self.scaler.scale(loss / self.grad_accum).backward()
        self._terms.append({"loss": loss.detach(), **(terms or {})})
        if output is not None:
            self._outputs.append(output.detach())

    def step(self) -> Tensor:
        """unscale -> clip -> optimizer step -> scheduler step; returns the pre-clip gradient norm (a
        tensor: no host sync)."""
        if self._parts != self.grad_accum:
            raise RuntimeError(f"Updater.step after {self._parts} backward(s), expected grad_accum={self.grad_accum}")
        self._parts = 0
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else math.inf)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return norm

    def logged_step(self) -> dict[str, Any]:
        """`step()`, returning the step's log terms: the mean over its micro-batches of the loss and the
        terms given to backward, the lr the step used and the pre-clip gradient norm."""
        lr = self.lr  # before step() moves the schedule on
        grad_norm = self.step()
        return {**mean_terms(self._terms), "lr": lr, "grad_norm": grad_norm}

    @property
    def output(self) -> Tensor:
        """The outputs given to this step's backward calls, concatenated: (B, ...) of the whole batch."""
        return torch.cat(self._outputs)

    def set_lr(self, lr: float) -> None:
        """Make `lr` the base rate after a checkpoint restored the old one (lr may change on resume):
        the current rate is lr * schedule factor at the restored step."""
        self.sched.base_lrs = [lr] * len(self.opt.param_groups)
        for group, factor in zip(self.opt.param_groups, self.sched.lr_lambdas, strict=True):
            group["initial_lr"], group["lr"] = lr, lr * factor(self.sched.last_epoch)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved with the scaler disabled
            self.scaler.load_state_dict(state["scaler"])


class EMA(nn.Module):
    """Exponential moving average of `source`'s parameters (buffers are copied), with the usual
    warm-up decay_t = min(decay, (1 + t) / (10 + t)) so short runs are not dominated by the init.
    Its state_dict is the averaged module's."""

    source: nn.Module  # set in __init__ as a plain reference, not a submodule

    def __init__(self, source: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(unwrap(source)).eval().requires_grad_(False)
        self.__dict__["source"] = unwrap(source)  # a plain reference, not a registered submodule

    # nn.Module overloads state_dict (destination= or not); this forwards either to the averaged module
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state, strict, assign)

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.module.parameters()), list(self.source.parameters()), 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), self.source.buffers(), strict=True):
            b_ema.copy_(b)


def check_finite(nonfinite: Tensor, stage: str, step: int, d: Dist) -> None:
    """Raise NonFiniteLossError when any rank saw a NaN/Inf loss since the last check (one host sync)."""
    flag = nonfinite.float()
    if d.world_size > 1:  # every rank must stop together, or the others hang in the next collective
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if bool(flag):
        raise NonFiniteLossError(
            f"{stage}: the loss became NaN/Inf at or before step {step}; stopped without saving (the last good "
            f"checkpoint is the stage folder's `latest`). Lower the learning rate or raise grad clipping, then resume."
        )
