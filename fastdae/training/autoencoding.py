"""What stage 1 and stage 2 share: the autoencoder losses of docs/paper.md §3 with their optimizers, the
discriminator's update, and the reconstruction evaluation of the fixed evaluation set."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fastdae.data import MapDataset
from fastdae.models.losses import AutoencoderLoss
from fastdae.training.checkpoint import State, restore
from fastdae.training.distributed import wrap_ddp
from fastdae.training.logs import Trackers, eval_chunks, notice_once, reconstruction_eval
from fastdae.training.optim import Updater
from fastdae.training.run import Run

LPIPS_OFF = "LPIPS is off: no local VGG16 weights given (set lpips_trunk to a torchvision vgg16 state dict)"


def losses_and_state(
    run: Run, s: Any, stage: str, name: str, generator: nn.Module, decoder: nn.Module
) -> tuple[AutoencoderLoss, State, int]:
    """The criterion (L1 + LPIPS + GAN), a checkpoint State and the step to start from. The State holds
    `generator` as `name` with its Updater (the stage's loop options), the EMA of `decoder` as
    emas["decoder"] when s.ema_decay > 0 and, when the GAN is on, the discriminator with its own
    Updater (Adam at disc.lr, constant, no warm-up; grad_accum, grad_clip and fp16 as the stage); on
    resume it is restored from the stage's checkpoint, with the configured learning rates."""
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
    state.keep_ema("decoder", decoder, s.ema_decay)
    start = restore(run.resume_from[stage], state, {name: s.lr, "discriminator": s.disc.lr})
    return crit, state, start


def update_step(
    run: Run, crit: AutoencoderLoss, state: State, name: str, step: int, x: Tensor
) -> tuple[dict[str, Any], Tensor]:
    """After the generator's micro-batches (each backward given its loss terms and x_hat): the
    generator's optimizer step, the discriminator's when the GAN is on, then the EMA's. Returns the
    step's log terms and x_hat (B, 3, H, W)."""
    upd = state.updaters[name]
    terms, x_hat = upd.logged_step(), upd.output
    if crit.gan_active(step):
        terms["d_loss"] = discriminator_step(run, crit, state, x, x_hat)
    state.update_emas(step)
    return terms, x_hat


def discriminator_step(run: Run, crit: AutoencoderLoss, state: State, x: Tensor, x_hat: Tensor) -> Tensor:
    """One hinge-loss step of the discriminator on real x and (detached) x_hat (B, 3, H, W), in the
    stage's micro-batches; returns its loss (the mean over them)."""
    disc_train = crit.disc_train
    if disc_train is None:
        raise ValueError("discriminator_step: the GAN is off (disc.weight = 0)")
    upd = state.updaters["discriminator"]
    for xm, xm_hat in upd.micro_batches((x, x_hat.detach()), disc_train):
        with run.autocast():
            d_loss = crit.discriminator_loss(xm, xm_hat)
        upd.backward(d_loss)
    return upd.logged_step()["loss"]


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
