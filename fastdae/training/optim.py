"""Optimisation pieces every stage uses: Adam with warm-up, one update step, the learning rate a
resumed run may change, EMA of weights, and the NaN/Inf guard."""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastdae.training.distributed import Dist, unwrap

Scheduler = torch.optim.lr_scheduler.LambdaLR


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; the run stopped without writing a checkpoint after it."""


def make_optimizer(params: Iterable[Tensor], lr: float, betas: tuple[float, float] | list[float],
                   warmup_steps: int) -> tuple[torch.optim.Optimizer, Scheduler]:
    """Adam with a linear warm-up to `lr` over `warmup_steps`, then constant."""
    opt = torch.optim.Adam(params, lr=lr, betas=tuple(betas))
    sched = Scheduler(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    return opt, sched


def set_base_lr(opt: torch.optim.Optimizer, sched: Scheduler, lr: float) -> None:
    """Make `lr` the base rate after a checkpoint restored the old one (lr may change on resume):
    the current rate is lr * warm-up factor at the restored step."""
    sched.base_lrs = [lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)


def optimizer_step(loss: Tensor, opt: torch.optim.Optimizer, sched: Scheduler, params: list[Tensor],
                   grad_clip: float) -> Tensor:
    """zero_grad -> backward -> clip -> step -> schedule; returns the pre-clip gradient norm (a tensor: no sync)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    opt.step()
    sched.step()
    return norm


class EMA(nn.Module):
    """Exponential moving average of `source`'s parameters (buffers are copied), with the usual
    warm-up decay_t = min(decay, (1 + t) / (10 + t)) so short runs are not dominated by the init.
    Its state_dict is the averaged module's."""

    def __init__(self, source: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(unwrap(source)).eval().requires_grad_(False)
        self.__dict__["source"] = unwrap(source)  # a plain reference, not a registered submodule

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state, strict, assign)

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.module.parameters()), list(self.source.parameters()), 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), self.source.buffers()):
            b_ema.copy_(b)


def ema_or_none(module: nn.Module, decay: float) -> EMA | None:
    return EMA(module, decay) if decay > 0 else None


def check_finite(nonfinite: Tensor, stage: str, step: int, d: Dist) -> None:
    """Raise NonFiniteLossError when any rank saw a NaN/Inf loss since the last check (one host sync)."""
    flag = nonfinite.float()
    if d.world_size > 1:  # every rank must stop together, or the others hang in the next collective
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if bool(flag):
        raise NonFiniteLossError(
            f"{stage}: the loss became NaN/Inf at or before step {step}; stopped without saving (the last good "
            f"checkpoint is the stage folder's `latest`). Lower the learning rate or raise grad clipping, then resume.")
