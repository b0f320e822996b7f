"""Shared helpers of the prior diagnosis: a finished run's pieces (cache, frozen bottleneck, final
decoder), the judge classifier (fastdae.compare.build_judge, trained once and reused from a folder),
and sample scoring with fastdae.measure.sample_validity. Run scripts from the worktree root with
PYTHONPATH=$PWD; every script pins torch to one thread so several can share the 2-core machine."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from fastdae import measure as M  # noqa: E402
from fastdae.cache import LatentCache  # noqa: E402
from fastdae.compare import EvalConfig, build_judge  # noqa: E402
from fastdae.config import TrainConfig, preset  # noqa: E402
from fastdae.models.autoencoder import build_bottleneck, build_decoder  # noqa: E402
from fastdae.train.loop import load_weights  # noqa: E402

JUDGE_DIR = Path(
    "runs/p/judge"
)  # under the repo root (git ignores runs/); classifier weights are rebuilt by build_judge when missing


def judge(cfg: TrainConfig | None = None):
    cfg = cfg or preset("default")
    return build_judge(cfg, EvalConfig(), JUDGE_DIR, log=lambda m: print(m, file=sys.stderr))


def load_run(run: str | Path):
    """(cfg, cache, all latents (N, C, h, w) float32, labels (N,), bottleneck, decoder) of a finished run."""
    run = Path(run)
    cfg = TrainConfig.load(run / "config.yaml")
    cache = LatentCache(run / "cache", verify="lazy")
    bottleneck = build_bottleneck(cfg.autoencoder)
    load_weights(run / "stage1" / "encoder.safetensors", bottleneck, prefix="bottleneck.")
    bottleneck.eval().requires_grad_(False)
    decoder = build_decoder(cfg.autoencoder)
    load_weights(run / ("stage1" if cfg.mode == "joint" else "stage2") / "decoder.safetensors", decoder)
    decoder.eval().requires_grad_(False)
    fields = cache.gather(list(range(len(cache))))
    with torch.no_grad():
        z = bottleneck.latent(fields, sample=False).float()
    return cfg, cache, z, fields["label"].long(), bottleneck, decoder


@torch.no_grad()
def decode(decoder, z: torch.Tensor) -> torch.Tensor:
    return torch.cat([decoder(c) for c in z.split(128)]).clamp(-1, 1)


def score(j, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return M.sample_validity(j.classifier, images, labels)


def dump(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2))
    print(json.dumps(obj, indent=2))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t0
