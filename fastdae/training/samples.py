"""The samples stage: prior.num_samples DiT samples (labels cycling over the classes), decoded by the
final decoder (stage 2's, or stage 1's in mode "joint"). VQ samples are snapped to their nearest
code (fastdae.vq_nearest) before decoding. Writes samples/grid.png and samples/images.safetensors,
and, with prior.judge_steps > 0 on a dataset with classes, scores the samples with the judge
classifier (`judge_samples`): their class accuracy and validity go to the stage's metrics, so
summary.json states what the grid shows as numbers.

`Sampler` (built from a Run by `build_sampler`) is the one decoding path from DiT noise to images:
this stage draws its grid with it, and `fastdae.sample` its N samples at scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastdae.config import PriorConfig
from fastdae.models.diffusion import SAMPLERS, Diffusion, Generators, LatentScaler, make_diffusion
from fastdae.models.dit import DiT
from fastdae.training.checkpoint import load_weights, save_weights
from fastdae.training.distributed import autocast
from fastdae.training.logs import Trackers, save_grid
from fastdae.training.prior import build_dit
from fastdae.training.run import Run, log


@dataclass
class Sampler:
    """A trained prior + decoder, ready to turn labels and noise generators into images.

    scaler maps the DiT's unit-variance latents back to the decoder's; with a VQ bottleneck
    (`bottleneck` set) samples are snapped to their nearest code before decoding (DESIGN.md)."""

    dit: DiT
    decoder: nn.Module
    scaler: LatentScaler
    diffusion: Diffusion
    bottleneck: nn.Module | None  # the frozen VQ bottleneck, None for KL latents
    steps: int
    sampler: str
    cfg_scale: float
    clip_x0: float  # 0: off
    precision: str
    device: torch.device
    identity: dict[str, Any]  # what the samples depend on besides the noise: weights' sha256, settings

    @property
    def num_classes(self) -> int:
        return self.dit.num_classes

    @torch.no_grad()
    def images(self, n: int, labels: Tensor | None, generator: Generators) -> Tensor:
        """n images (n, 3, H, W) float in [-1, 1] on the device. labels (n,) or None (unconditional);
        generator: one for the batch, or one per sample (Diffusion.sample)."""
        B, C, h = n, self.dit.in_channels, self.dit.input_size
        y = labels.to(self.device) if labels is not None else None
        with autocast(self.device, self.precision):
            z = self.diffusion.sample(
                self.dit,
                (B, C, h, h),
                y=y,
                steps=self.steps,
                sampler=self.sampler,
                cfg_scale=self.cfg_scale,
                generator=generator,
                device=self.device,
                clip_x0=self.clip_x0 or None,
            )
        z = self.scaler.denormalize(z.float())  # (B, C, h, h) in the decoder's latent scale
        if self.bottleneck is not None:
            from fastdae import vq_nearest

            idx, _ = vq_nearest(z.permute(0, 2, 3, 1).reshape(-1, C), self.bottleneck.quantizer.codebook)  # (B*h*h,)
            z = self.bottleneck.latent({"indices": idx.view(B, h, h)})
        with autocast(self.device, self.precision):
            return self.decoder(z).float().clamp(-1, 1)  # (B, 3, H, W)

    def generate(self, n: int, labels: Tensor | None, generator: Generators) -> Tensor:
        """`images`, as (n, H, W, 3) uint8 on the CPU."""
        return to_uint8(self.images(n, labels, generator))


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU, rounded to the nearest level."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


# settings added to the sampler's identity since it was first recorded, at the default that samples what
# the older code sampled (an older record lacks them: fastdae.sampling reuses it at these values)
SETTINGS_SINCE = {"clip_x0": PriorConfig.clip_x0}


def build_sampler(
    r: Run, steps: int | None = None, sampler: str | None = None, cfg_scale: float | None = None
) -> Sampler:
    """The run's DiT (prior/dit.safetensors, EMA weights when the run kept them), its final decoder,
    the cache's per-channel latent statistics (the cache checked against the encoder and dataset) and,
    for VQ, the frozen codebook. steps, sampler, cfg_scale default to the run's prior config."""
    cfg, p = r.cfg, r.cfg.prior
    settings = {
        "steps": p.sample_steps if steps is None else steps,
        "sampler": sampler or p.sampler,
        "cfg_scale": p.cfg_scale if cfg_scale is None else cfg_scale,
    }
    if settings["sampler"] not in SAMPLERS or settings["steps"] < 1:
        raise ValueError(f"sampler must be one of {SAMPLERS} and steps >= 1, got {settings}")
    dit_file = r.require(r.dit_file, "prior")
    decoder_file = r.require(r.decoder_file(r.final_decoder_stage), r.final_decoder_stage)
    cache = r.open_cache()
    dit = build_dit(r)
    load_weights(dit_file, dit)
    decoder = r.build_decoder()  # fastdae's, or one in stage1.encoder's architecture
    load_weights(decoder_file, decoder)
    identity = {
        "run": str(r.root.resolve()),
        "dit_sha256": r.sha256(dit_file),
        "decoder_sha256": r.sha256(decoder_file),
        "objective": p.objective,
        "schedule": p.schedule,
        "num_timesteps": p.num_timesteps,
        "clip_x0": p.clip_x0,
        "precision": cfg.precision,
        **settings,
    }
    return Sampler(
        dit=dit.to(r.device).eval(),
        decoder=decoder.to(r.device).eval(),
        scaler=LatentScaler(cache.channel_mean, cache.channel_std).to(r.device),
        diffusion=make_diffusion(p.objective, p.schedule, p.num_timesteps),
        bottleneck=r.frozen_bottleneck() if r.bottleneck_kind == "vq" else None,
        clip_x0=p.clip_x0,
        precision=cfg.precision,
        device=r.device,
        identity=identity,
        **settings,
    )


def run(r: Run) -> dict[str, Any]:
    cfg = r.cfg
    if not r.dist.is_main:
        return {}
    s = build_sampler(r)
    t0 = time.perf_counter()
    n = cfg.prior.num_samples
    y = torch.arange(n) % s.num_classes if s.num_classes > 0 else None
    images = s.images(n, y, torch.Generator(r.device).manual_seed(cfg.seed))  # (n, 3, H, W)
    elapsed = time.perf_counter() - t0
    grid = save_grid(images, r.sample_grid)
    trackers = Trackers(r, "samples")
    trackers.image("samples", images, cfg.prior.steps)  # at the prior's last step
    trackers.close()
    save_weights(r.sample_images, {"images": images.cpu(), **({"labels": y} if y is not None else {})})
    decoder_file = r.decoder_file(r.final_decoder_stage).relative_to(r.root)
    metrics = {
        "num_samples": n,
        "decoder": str(decoder_file),
        "grid": str(grid),
        "time_s": elapsed,
        "samples_per_s": n / elapsed,
    }
    if cfg.prior.judge_steps > 0 and y is not None and s.num_classes >= 2:
        metrics.update(judge_samples(r, images.cpu(), y))
    return metrics


def judge_samples(r: Run, images: Tensor, labels: Tensor) -> dict[str, Any]:
    """Class accuracy (argmax = the class asked for), validity (top softmax >= the threshold) and
    FD-feat of the samples (n, 3, H, W) asked for `labels` (n,), by the judge of fastdae.evaluation:
    a classifier trained for prior.judge_steps steps on held-out items only (never trained on; kept
    in run/judge/ and reused while the data and steps stay), with what held-out real images score
    under "judge" (the ceiling)."""
    from fastdae import metrics as M
    from fastdae.evaluation.judge import EvalConfig, build_judge

    ev = EvalConfig(classifier_steps=r.cfg.prior.judge_steps)
    judge = build_judge(r.cfg, ev, r.root, log.info)
    scores = M.sample_validity(judge.classifier, images, labels, ev.validity_threshold)
    scores["fd_feat"] = M.frechet_score(judge.classifier, images, judge.stats["FD-feat"], ev.batch_size)
    log.info(
        f"samples: class accuracy {scores['class_accuracy']:.3f}, validity {scores['validity']:.3f} "
        f"(judge; real held-out images: {judge.reference.get('class_accuracy_real', float('nan')):.3f}, "
        f"{judge.reference.get('validity_real', float('nan')):.3f})"
    )
    return {
        **scores,
        "judge": {
            "validity_threshold": ev.validity_threshold,
            "classifier_steps": ev.classifier_steps,
            **judge.reference,
            **judge.split,
        },
    }
