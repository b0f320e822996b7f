"""Stage 1 (PAPER.md §2): encoder + bottleneck + auxiliary decoder, trained with the autoencoder losses.

mode "dae": the weak auxiliary decoder (weak_decoder config), stage1.steps steps.
mode "control": the full decoder, stage1.steps steps (a fresh full decoder follows in stage 2).
mode "joint": the full decoder, stage1.steps + stage2.steps steps (equal compute; no stage 2).
Writes stage1/encoder.safetensors (encoder.* and bottleneck.* weights: what the cache step reads)
and stage1/decoder.safetensors (the decoder, EMA weights when enabled).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fastdae.data import build_dataset
from fastdae.models.autoencoder import Autoencoder, build_decoder
from fastdae.models.losses import AutoencoderLoss
from fastdae.train import loop

ENCODER_FILE = "encoder.safetensors"
DECODER_FILE = "decoder.safetensors"


def stage1_steps(cfg: Any) -> int:
    return cfg.stage1.steps + cfg.stage2.steps if cfg.mode == "joint" else cfg.stage1.steps


class AutoencoderUpdate:
    """The optimisation step shared by stage 1 and stage 2: generator loss (PAPER.md §3) -> Adam step of
    `generator`, then (after disc.start) one hinge-loss step of the discriminator. `modules`,
    `optimizers`, `schedulers` are what a checkpoint of the stage holds."""

    def __init__(self, ctx: loop.Context, cfg: Any, name: str, generator: nn.Module) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.crit = AutoencoderLoss(cfg, ctx.device, wrap=lambda m: loop.wrap_ddp(m, ctx.dist, ctx.device))
        self.params = list(generator.parameters())
        opt, sched = loop.make_optimizer(self.params, cfg.lr, cfg.betas, cfg.warmup_steps)
        self.modules: dict[str, nn.Module] = {name: generator}
        self.optimizers, self.schedulers = {name: opt}, {name: sched}
        self.name = name
        if self.crit.discriminator is not None:
            self.modules["discriminator"] = self.crit.discriminator
            self.optimizers["discriminator"], self.schedulers["discriminator"] = loop.make_optimizer(
                self.crit.discriminator.parameters(), cfg.disc.lr, cfg.betas, 0)

    def __call__(self, x: Tensor, forward: Callable[[], tuple[Tensor, Tensor | float]], step: int,
                 last_layer: Tensor) -> dict[str, Tensor]:
        """x (B, 3, H, W) targets; forward() -> (x_hat, bottleneck term) under autocast."""
        with self.ctx.autocast():
            x_hat, aux = forward()
            loss, terms = self.crit.generator_loss(x, x_hat, aux, step, last_layer)
        terms["grad_norm"] = loop.optimizer_step(loss, self.optimizers[self.name], self.schedulers[self.name],
                                                 self.params, self.cfg.grad_clip)
        if self.crit.gan_active(step):
            with self.ctx.autocast():
                d_loss = self.crit.discriminator_loss(x, x_hat)
            loop.optimizer_step(d_loss, self.optimizers["discriminator"], self.schedulers["discriminator"],
                                list(self.crit.discriminator.parameters()), self.cfg.grad_clip)
            terms["d_loss"] = d_loss.detach()
        return {"loss": loss.detach(), **terms}


def run(ctx: loop.Context) -> dict[str, Any]:
    cfg, s, device = ctx.cfg, ctx.cfg.stage1, ctx.device
    batch = loop.per_rank_batch(s.batch_size, ctx.dist, "stage1.batch_size")
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank and every resume
    weak = cfg.weak_decoder if cfg.mode == "dae" else None
    ae = Autoencoder(cfg.autoencoder, build_decoder(cfg.autoencoder, weak)).to(device)
    ae_train = loop.wrap_ddp(ae, ctx.dist, device)
    update = AutoencoderUpdate(ctx, s, "autoencoder", ae)
    emas = {"decoder": loop.EMA(ae.decoder, s.ema_decay)} if s.ema_decay > 0 else {}
    dataset = build_dataset(cfg.data)

    def step(b: tuple[Tensor, Tensor], i: int) -> dict[str, Tensor]:
        x = b[0]
        return update(x, lambda: ae_train(x), i, ae.decoder.last_layer)

    def grid(path: Any) -> dict[str, float]:
        ae.eval()  # no dropout, no EMA codebook updates
        decoder = emas["decoder"].module if emas else ae.decoder

        def pairs() -> Any:
            for idx in loop.eval_chunks(len(dataset)):
                x = loop.images_at(dataset, idx).to(device)
                with torch.no_grad(), ctx.autocast():
                    fields, _ = ae.encode_fields(x)
                    x_hat = decoder(ae.bottleneck.latent(fields, sample=False))
                yield x, x_hat

        return loop.reconstruction_eval(pairs(), path)

    stage = loop.Stage("stage1", stage1_steps(cfg), batch, s.log_every, s.ckpt_every,
                       lambda start: loop.image_batches(dataset, batch, cfg.seed, start, ctx.dist, cfg.num_workers, device),
                       step, update.modules, update.optimizers, update.schedulers, emas, grid)
    ae.train()
    metrics = loop.run_stage(ctx, stage)
    if ctx.dist.is_main:
        out = ctx.stage_dir("stage1")
        loop.save_weights(out / ENCODER_FILE, {**{f"encoder.{k}": v for k, v in ae.encoder.state_dict().items()},
                                               **{f"bottleneck.{k}": v for k, v in ae.bottleneck.state_dict().items()}})
        loop.save_weights(out / DECODER_FILE, (emas["decoder"].module if emas else ae.decoder).state_dict())
    metrics["decoder"] = "weak" if weak is not None else "full"
    metrics["lpips"] = update.crit.lpips is not None
    return metrics
