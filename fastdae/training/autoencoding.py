"""What stage 1 and stage 2 share: the autoencoder losses of PAPER.md §3 with their optimizers, the
discriminator's update, and the reconstruction evaluation of the fixed evaluation set."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fastdae.models.losses import AutoencoderLoss
from fastdae.training.checkpoint import State
from fastdae.training.distributed import wrap_ddp
from fastdae.training.logs import eval_chunks, reconstruction_eval
from fastdae.training.optim import make_optimizer, optimizer_step
from fastdae.training.run import Run


def losses_and_state(run: Run, s: Any, name: str, generator: nn.Module) -> tuple[AutoencoderLoss, State]:
    """The criterion (L1 + LPIPS + GAN) and a checkpoint State with `generator`'s Adam and, when the
    GAN is on, the discriminator with its own Adam (disc.lr, no warm-up)."""
    crit = AutoencoderLoss(s, run.device, wrap=lambda m: wrap_ddp(m, run.dist, run.device))
    opt, sched = make_optimizer(generator.parameters(), s.lr, s.betas, s.warmup_steps)
    state = State({name: generator}, {name: opt}, {name: sched})
    if crit.discriminator is not None:
        state.modules["discriminator"] = crit.discriminator
        state.optimizers["discriminator"], state.schedulers["discriminator"] = make_optimizer(
            crit.discriminator.parameters(), s.disc.lr, s.betas, 0)
    return crit, state


def learning_rates(s: Any, name: str) -> dict[str, float]:
    """Configured learning rates by optimizer name (applied again after a resume)."""
    return {name: s.lr, "discriminator": s.disc.lr}


def discriminator_step(run: Run, crit: AutoencoderLoss, s: Any, state: State, x: Tensor, x_hat: Tensor) -> Tensor:
    """One hinge-loss step of the discriminator on real x and (detached) x_hat; returns its loss."""
    with run.autocast():
        d_loss = crit.discriminator_loss(x, x_hat)
    optimizer_step(d_loss, state.optimizers["discriminator"], state.schedulers["discriminator"],
                   list(crit.discriminator.parameters()), s.grad_clip)
    return d_loss.detach()


@torch.no_grad()
def evaluate(run: Run, stage: str, reconstruct: Callable[[list[int]], tuple[Tensor, Tensor]]) -> dict[str, float]:
    """L1/PSNR over the fixed evaluation set and stage/reconstructions.png; reconstruct(indices) ->
    (x, x_hat) of those dataset items."""

    def pairs() -> Iterator[tuple[Tensor, Tensor]]:
        for idx in eval_chunks(len(run.dataset)):
            with run.autocast():
                pair = reconstruct(idx)
            yield pair

    return reconstruction_eval(pairs(), run.stage_dir(stage) / "reconstructions.png")


def images_at(dataset: Any, indices: list[int]) -> Tensor:
    """(B, 3, H, W) images of dataset items."""
    return torch.stack([dataset[i][0] for i in indices])
