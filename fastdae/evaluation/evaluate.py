"""Every metric of docs/paper.md §5 for one finished run (`evaluate_run`): reconstruction of held-out
images, the decoded DiT samples against the judge, decoder complexity on scale-normalised latents,
and the minimal-capacity probe with the penalised distance. The run's files are found through
fastdae.training.paths.RunFolder (the one owner of the run layout)."""

from __future__ import annotations

import csv
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from fastdae import measure as M
from fastdae.config import TrainConfig
from fastdae.measure.judge import EvalConfig, Judge, device_of, training_images
from fastdae.training.paths import RunFolder

if TYPE_CHECKING:
    from fastdae.models.autoencoder import Decoder, Encoder, KLBottleneck, VQBottleneck


def _load_autoencoder(run: RunFolder, device: torch.device) -> tuple[Encoder, VQBottleneck | KLBottleneck, Decoder]:
    """The run's frozen encoder and bottleneck (stage 1) and final decoder (stage 1's in mode joint,
    else stage 2's), in eval mode."""
    from fastdae.models.autoencoder import build_bottleneck, build_decoder, build_encoder
    from fastdae.training.checkpoint import load_weights

    ae = run.cfg.autoencoder
    encoder, bottleneck, decoder = build_encoder(ae), build_bottleneck(ae), build_decoder(ae)
    load_weights(run.encoder_file, encoder, prefix="encoder.")
    load_weights(run.encoder_file, bottleneck, prefix="bottleneck.")
    load_weights(run.decoder_file(run.final_decoder_stage), decoder)
    for m in (encoder, bottleneck, decoder):
        m.to(device).eval().requires_grad_(False)  # in place
    return encoder, bottleneck, decoder


@torch.no_grad()
def _encode(encoder: nn.Module, bottleneck: VQBottleneck | KLBottleneck, images: Tensor, batch_size: int) -> Tensor:
    """Deterministic latents (N, C, h, w): VQ codebook vectors, or the KL posterior mean."""
    device = next(encoder.parameters()).device
    return torch.cat([bottleneck.encode_fields(encoder(x.to(device)))[1] for x in images.split(batch_size)])


def _final_prior_loss(run: RunFolder) -> float:
    """The DiT's final training loss: mean of the last 10% of logged steps (at least one row)."""
    with open(run.log_csv("prior")) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    return float(np.mean(losses[-max(1, len(losses) // 10) :]))


def evaluate_run(run_cfg: TrainConfig, judge: Judge, ev: EvalConfig) -> dict[str, Any]:
    """Every metric of docs/paper.md §5 for one finished run (see EvalConfig for what is measured how)."""
    from safetensors.torch import load_file

    from fastdae.cache import LatentCache
    from fastdae.models.autoencoder import Decoder

    run, ae, device = RunFolder(run_cfg), run_cfg.autoencoder, device_of(run_cfg)
    encoder, bottleneck, decoder = _load_autoencoder(run, device)
    out: dict[str, Any] = {}
    # reconstruction of the judge's held-out evaluation images
    x = judge.images
    z = _encode(encoder, bottleneck, x, ev.batch_size)
    with torch.no_grad():
        x_hat = torch.cat([decoder(c) for c in z.split(ev.batch_size)]).clamp(-1, 1).cpu()
    out["psnr"], out["ssim"] = M.psnr(x, x_hat).mean().item(), M.ssim(x, x_hat).mean().item()
    if judge.lpips is not None:
        out["lpips"] = M.lpips_distance(x.to(device), x_hat.to(device), judge.lpips).mean().item()
    # generation: the run's decoded DiT samples
    saved = load_file(str(run.sample_images))
    samples, labels = saved["images"], saved.get("labels")
    for f in (judge.classifier, judge.inception):
        if f is not None:
            out[M.frechet_name(f, reconstruction=True).lower().replace("-", "_")] = M.frechet_score(
                f, x_hat, judge.stats[M.frechet_name(f)], ev.batch_size
            )
            out[M.frechet_name(f).lower().replace("-", "_")] = M.frechet_score(
                f, samples, judge.stats[M.frechet_name(f)], ev.batch_size
            )
    if judge.classifier is not None:
        out.update(M.sample_validity(judge.classifier, samples, labels, ev.validity_threshold))
    out["num_samples"] = len(samples)
    out["prior_loss"] = _final_prior_loss(run)
    # decoder complexity on scale-normalised latents (the cache's per-channel statistics)
    cache = LatentCache(run.cache_dir, verify="lazy")
    dec_n, z_n = M.scale_normalize(decoder, z, cache.channel_mean, cache.channel_std)
    probe = z_n[: ev.probe_latents]
    out["lipschitz"] = M.lipschitz_lower_bound(dec_n, z_n, pairs=ev.lipschitz_pairs, seed=run_cfg.seed)
    out["jac_spectral"] = M.jacobian_spectral_norm(dec_n, probe, seed=run_cfg.seed)
    out["jac_frobenius_sq"], out["jac_frobenius"] = M.jacobian_frobenius_hutchinson(dec_n, probe, seed=run_cfg.seed)
    # capacity and the penalised distance: decoders of each width fitted to frozen training latents
    x_train = training_images(run_cfg.data, ev.capacity_images)
    _, z_train = M.scale_normalize(
        decoder, _encode(encoder, bottleneck, x_train, ev.batch_size), cache.channel_mean, cache.channel_std
    )
    target = M.DATA_RANGE**2 / 10 ** (ev.capacity_target_psnr / 10)  # PSNR -> MSE

    def make_decoder(width: int) -> nn.Module:
        return Decoder(width, ae.ch_mult, ae.num_res_blocks, ae.z_channels, ae.attn)

    out["min_width"], family = M.minimal_capacity(
        make_decoder, z_train, x_train.to(device), ev.capacity_widths, target, ev.capacity_steps, seed=run_cfg.seed
    )
    out["capacity_curve"] = [f.summary() for f in family]
    if judge.classifier is not None:
        pd = M.penalised_distance(
            family,
            z_train,
            x_train.to(device),
            judge.classifier,
            ev.lam,
            "spectral",
            ev.probe_latents,
            ev.batch_size,
            run_cfg.seed,
        )
        out["penalised_distance"], out["penalised_terms"] = pd["value"], pd
    return out
