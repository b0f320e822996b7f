"""Validity / class accuracy of real latents (the run's cache) through the run's final decoder."""

import sys

import numpy as np
import torch

from fastdae import measure as M
from fastdae.measure.judge import EvalConfig, build_judge
from fastdae.training.checkpoint import load_weights
from fastdae.training.run import Run

r = Run.open(sys.argv[1])
judge = build_judge(r.cfg, EvalConfig(), r.root, lambda *a: None)
cache = r.open_cache()
bott = r.frozen_bottleneck()
dec = r.build_decoder()
load_weights(r.decoder_file(r.final_decoder_stage), dec)
dec.eval()
f = cache.gather(np.arange(1024))
print({k: tuple(v.shape) for k, v in f.items()})
with torch.no_grad():
    z = bott.latent({k: v for k, v in f.items() if k != "label"}, sample=False)  # VQ codes, or the KL mean (sixth pass)
    x = dec(z).clamp(-1, 1)
print("real latents decoded:", M.sample_validity(judge.classifier, x, f["label"].long()))
