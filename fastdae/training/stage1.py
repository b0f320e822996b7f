"""Stage 1 (docs/paper.md §2): encoder + bottleneck + auxiliary decoder, trained with the autoencoder losses.

mode "dae": the weak auxiliary decoder (weak_decoder config), stage1.steps steps.
mode "control": the full decoder, stage1.steps steps (a fresh full decoder follows in stage 2).
mode "joint": the full decoder, stage1.steps + stage2.steps steps (equal compute; no stage 2).
Writes stage1/encoder.safetensors (encoder.* and bottleneck.* weights: what the cache step reads)
and stage1/decoder.safetensors (the decoder, EMA weights when enabled).
"""

from __future__ import annotations

from typing import Any

import torch

from fastdae.models.autoencoder import Autoencoder, build_decoder
from fastdae.training import distributed
from fastdae.training.autoencoding import evaluate, images_at, losses_and_state, update_step
from fastdae.training.checkpoint import save_weights
from fastdae.training.distributed import image_batches, to_device, wrap_ddp
from fastdae.training.logs import StepLog
from fastdae.training.run import Run


def run(r: Run) -> dict[str, Any]:
    cfg, s, device = r.cfg, r.cfg.stage1, r.device
    _, steps = r.total_steps("stage1")
    batch = r.per_rank("stage1.batch_size")
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank and every resume
    weak = cfg.weak_decoder if cfg.mode == "dae" else None
    ae = Autoencoder(cfg.autoencoder, build_decoder(cfg.autoencoder, weak)).to(device)
    ae_train = wrap_ddp(ae, r.dist, device, s.compile)
    crit, state, start = losses_and_state(r, s, "stage1", "autoencoder", ae, ae.decoder)
    upd = state.updaters["autoencoder"]
    batches = image_batches(r.dataset, batch, cfg.seed, start, r.dist, cfg.num_workers, device)
    log = StepLog(r, "stage1", steps, start, s.log_every, s.ckpt_every, batch * r.dist.world_size)
    ae.train()
    for step in range(start, steps):
        distributed.seed_step(cfg.seed, "stage1", step, r.dist.rank)
        x = to_device(log.batch(batches)[0], device)  # (B, 3, H, W) in [-1, 1]
        for xm in upd.micro_batches(x, ae_train):  # (B / grad_accum, 3, H, W) each
            with r.autocast():
                x_hat, aux = ae_train(xm)  # aux: the bottleneck's loss term (VQ commitment / KL)
                loss, terms = crit.generator_loss(xm, x_hat, aux, step, ae.decoder.last_layer)
            upd.backward(loss, terms, x_hat)  # terms and x_hat kept for the log and the discriminator
        terms, x_hat = update_step(r, crit, state, "autoencoder", step, x)  # generator, discriminator, EMA
        log.step(step + 1, terms, images=(x, x_hat))
        r.save_if_due("stage1", step + 1, steps, s.ckpt_every, state)
    metrics = log.finish()

    decoder = state.final("decoder", ae.decoder)
    if r.dist.is_main:
        ae.eval()  # no dropout, no EMA codebook updates

        def reconstruct(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            x = images_at(r.dataset, idx).to(device)
            fields, _ = ae.encode_fields(x)
            return x, decoder(ae.bottleneck.latent(fields, sample=False))

        metrics["eval"] = evaluate(r, "stage1", reconstruct)
        save_weights(
            r.encoder_file,
            {
                **{f"encoder.{k}": v for k, v in ae.encoder.state_dict().items()},
                **{f"bottleneck.{k}": v for k, v in ae.bottleneck.state_dict().items()},
            },
        )
        save_weights(r.decoder_file("stage1"), decoder.state_dict())
    metrics["decoder"] = "weak" if weak is not None else "full"
    metrics["lpips"] = crit.lpips is not None
    return metrics
