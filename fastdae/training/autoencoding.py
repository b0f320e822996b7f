"""What stage 1 and stage 2 share: the autoencoder losses of docs/paper.md §3 with their optimizers, the
discriminator's update, and the reconstruction evaluation of the fixed evaluation set."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fastdae.data import MapDataset
from fastdae.models.losses import AutoencoderLoss
from fastdae.training.checkpoint import State
from fastdae.training.distributed import wrap_ddp
from fastdae.training.logs import Trackers, eval_chunks, mean_terms, notice_once, reconstruction_eval
from fastdae.training.optim import Updater
from fastdae.training.run import Run

LPIPS_OFF = "LPIPS is off: no local VGG16 weights given (set lpips_trunk to a torchvision vgg16 state dict)"


def losses_and_state(run: Run, s: Any, stage: str, name: str, generator: nn.Module) -> tuple[AutoencoderLoss, State]:
    """The criterion (L1 + LPIPS + GAN) and a checkpoint State with `generator`'s Updater (the stage's
    loop options) and, when the GAN is on, the discriminator with its own (Adam at disc.lr, constant,
    no warm-up; grad_accum, grad_clip and fp16 as the stage)."""
    crit = AutoencoderLoss(s, run.device, wrap=lambda m: wrap_ddp(m, run.dist, run.device, s.compile))
    if crit.lpips is None and s.lpips_weight > 0:
        notice_once(run, "lpips_off", LPIPS_OFF)
    steps = run.total_steps(stage)[1]
    state = State(
        {name: generator},
        {name: Updater(generator.parameters(), s, total_steps=steps, fp16=run.fp16, device=run.device)},
    )
    if crit.discriminator is not None:
        state.modules["discriminator"] = crit.discriminator
        state.updaters["discriminator"] = Updater(
            crit.discriminator.parameters(),
            s,
            total_steps=steps,
            fp16=run.fp16,
            device=run.device,
            lr=s.disc.lr,
            optimizer="adam",
            schedule="constant",
            warmup_steps=0,
        )
    return crit, state


def learning_rates(s: Any, name: str) -> dict[str, float]:
    """Configured learning rates by optimizer name (applied again after a resume)."""
    return {name: s.lr, "discriminator": s.disc.lr}


def update_step(
    run: Run,
    crit: AutoencoderLoss,
    state: State,
    name: str,
    step: int,
    x: Tensor,
    micro: list[tuple[dict[str, Tensor], Tensor]],
) -> tuple[dict[str, Any], Tensor]:
    """After the generator's micro-batches (their loss terms and x_hat): the generator's optimizer
    step, then the discriminator's when the GAN is on. Returns the step's log terms and x_hat
    (B, 3, H, W)."""
    upd = state.updaters[name]
    terms = {**mean_terms([t for t, _ in micro]), "lr": upd.lr, "grad_norm": upd.step()}  # the lr this step used
    x_hat = torch.cat([xh for _, xh in micro])
    if crit.gan_active(step):
        terms["d_loss"] = discriminator_step(run, crit, state, x, x_hat)
    return terms, x_hat


def discriminator_step(run: Run, crit: AutoencoderLoss, state: State, x: Tensor, x_hat: Tensor) -> Tensor:
    """One hinge-loss step of the discriminator on real x and (detached) x_hat (B, 3, H, W), in the
    stage's micro-batches; returns its loss (the mean over them)."""
    disc_train = crit.disc_train
    if disc_train is None:
        raise ValueError("discriminator_step: the GAN is off (disc.weight = 0)")
    upd, losses = state.updaters["discriminator"], []
    for xm, xm_hat in upd.micro_batches((x, x_hat.detach()), disc_train):
        with run.autocast():
            d_loss = crit.discriminator_loss(xm, xm_hat)
        upd.backward(d_loss)
        losses.append({"d_loss": d_loss.detach()})
    upd.step()
    return mean_terms(losses)["d_loss"]


@torch.no_grad()
def evaluate(run: Run, stage: str, reconstruct: Callable[[list[int]], tuple[Tensor, Tensor]]) -> dict[str, float]:
    """L1/PSNR over the fixed evaluation set and stage/reconstructions.png; reconstruct(indices) ->
    (x, x_hat) of those dataset items."""

    def pairs() -> Iterator[tuple[Tensor, Tensor]]:
        for idx in eval_chunks(len(run.dataset)):
            with run.autocast():
                pair = reconstruct(idx)
            yield pair

    trackers = Trackers(run, stage)
    try:
        return reconstruction_eval(
            pairs(), run.stage_dir(stage) / "reconstructions.png", trackers, run.total_steps(stage)[1]
        )
    finally:
        trackers.close()


def images_at(dataset: MapDataset, indices: list[int]) -> Tensor:
    """(B, 3, H, W) images of dataset items."""
    return torch.stack([dataset[i][0] for i in indices])
