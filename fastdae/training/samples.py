"""The samples stage: prior.num_samples DiT samples (labels cycling over the classes), decoded by the
final decoder (stage 2's, or stage 1's in mode "joint"). VQ samples are snapped to their nearest
code (fastdae.vq_nearest) before decoding. Writes samples/grid.png and samples/images.safetensors,
and, with prior.judge_steps > 0 on a dataset with classes, scores the samples with the judge
classifier (`judge_samples`): their class accuracy and validity go to the stage's metrics, so
summary.json states what the grid shows as numbers.

`build_sampler` builds the run's `fastdae.sampler.Sampler`, the one decoding path from DiT noise to
images: this stage draws its grid with it, and `fastdae.sample` its N samples at scale.
"""

from __future__ import annotations

import time
from typing import Any, TypedDict

import torch
from torch import Tensor

from fastdae.config import PriorConfig
from fastdae.models.autoencoder import VQBottleneck
from fastdae.models.diffusion import SAMPLERS, LatentScaler, make_diffusion
from fastdae.sampler import Sampler
from fastdae.training.checkpoint import load_weights, save_weights
from fastdae.training.logs import Trackers, save_grid
from fastdae.training.prior import build_dit
from fastdae.training.run import Run, log

# settings added to the sampler's identity since it was first recorded, at the default that samples what
# the older code sampled (an older record lacks them: fastdae.sampling reuses it at these values)
SETTINGS_SINCE = {"clip_x0": PriorConfig.clip_x0}


class SamplerSettings(TypedDict):
    """How a Sampler draws (the prior config's, or fastdae.sample's arguments); part of its identity."""

    steps: int
    sampler: str
    cfg_scale: float


def build_sampler(
    r: Run, steps: int | None = None, sampler: str | None = None, cfg_scale: float | None = None
) -> Sampler:
    """The run's DiT (prior/dit.safetensors, EMA weights when the run kept them), its final decoder,
    the cache's per-channel latent statistics (the cache checked against the encoder and dataset) and,
    for VQ, the frozen codebook. steps, sampler, cfg_scale default to the run's prior config."""
    cfg, p = r.cfg, r.cfg.prior
    settings: SamplerSettings = {
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
    frozen = r.frozen_bottleneck() if r.bottleneck_kind == "vq" else None
    return Sampler(
        dit=dit.to(r.device).eval(),
        decoder=decoder.to(r.device).eval(),
        scaler=LatentScaler(cache.channel_mean, cache.channel_std).to(r.device),
        diffusion=make_diffusion(p.objective, p.schedule, p.num_timesteps),
        bottleneck=frozen if isinstance(frozen, VQBottleneck) else None,  # vq: samples snap to its codes
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
    from fastdae import measure as M
    from fastdae.measure.judge import EvalConfig, build_judge

    ev = EvalConfig(classifier_steps=r.cfg.prior.judge_steps)
    judge = build_judge(r.cfg, ev, r.root, log.info)
    classifier = judge.classifier
    if classifier is None:
        raise ValueError("judge_samples needs a dataset with >= 2 classes (the judge has no classifier)")
    scores = M.sample_validity(classifier, images, labels, ev.validity_threshold)
    scores["fd_feat"] = M.frechet_score(classifier, images, judge.stats["FD-feat"], ev.batch_size)
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
