"""Textures study: the decoder ceiling (real held-out latents decoded, judged) and re-sampling at several cfg scales.

usage: recon_and_cfg.py RUN JUDGE_DIR N CFG..."""

import sys
import time
from pathlib import Path

import torch

from fastdae import measure as M
from fastdae.evaluation.evaluate import _encode, _load_autoencoder
from fastdae.measure.judge import EvalConfig, build_judge
from fastdae.training.paths import RunFolder
from fastdae.training.run import Run
from fastdae.training.samples import build_sampler

run_dir, judge_dir, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
cfgs = [float(a) for a in sys.argv[4:]]
r = Run.open(run_dir)
judge = build_judge(r.cfg, EvalConfig(classifier_steps=300), judge_dir, print)
print("reference", judge.reference)
enc, bn, dec = _load_autoencoder(RunFolder(r.cfg), torch.device("cpu"))
z = _encode(enc, bn, judge.images, 128)
with torch.no_grad():
    xh = torch.cat([dec(c) for c in z.split(128)]).clamp(-1, 1)
print("recon", M.sample_validity(judge.classifier, xh, judge.labels), flush=True)
for c in cfgs:
    t0 = time.perf_counter()
    s = build_sampler(r, cfg_scale=c)
    y = torch.arange(n) % s.num_classes
    img = s.images(n, y, torch.Generator().manual_seed(100))
    print("cfg", c, M.sample_validity(judge.classifier, img, y), f"{time.perf_counter() - t0:.0f}s", flush=True)
