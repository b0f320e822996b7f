"""PSNR and shape chroma of held-out reconstructions through a run's final decoder; with GRID.png, also a
grid of the first 16 (top real, bottom reconstructed; fourth pass).

usage: colour.py RUN [GRID.png]"""

import json
import sys

import numpy as np
import torch

from fastdae.cache.format import gather_images
from fastdae.data import build_dataset, split_dataset
from fastdae.models.autoencoder import build_encoder
from fastdae.training.checkpoint import load_weights
from fastdae.training.run import Run

r = Run.open(sys.argv[1])
enc = build_encoder(r.cfg.autoencoder)
load_weights(r.encoder_file, enc, prefix="encoder.")
enc.eval()
bott = r.frozen_bottleneck()
dec = r.build_decoder()
load_weights(r.decoder_file(r.final_decoder_stage), dec)
dec.eval()
_, held = split_dataset(build_dataset(r.cfg.data), r.cfg.data)
x, y = gather_images(held, np.arange(256))
with torch.no_grad():
    xh = dec(bott.encode_fields(enc(x))[1]).clamp(-1, 1)
mse = ((xh - x) ** 2).mean((1, 2, 3))
psnr = (10 * torch.log10(4 / mse)).mean().item()
b = x.mean(1, keepdim=True)
thr = b.flatten(1).quantile(0.8, dim=1)[:, None, None, None]
mask = (b >= thr).float()


def col(t):
    return (t * mask).sum((2, 3)) / mask.sum((2, 3))


def chroma(t):
    return (col(t) - col(t).mean(1, keepdim=True)).abs().mean().item()


print(
    json.dumps(
        {
            "run": sys.argv[1],
            "psnr": round(psnr, 2),
            "colour_err": round((col(xh) - col(x)).abs().mean().item(), 4),
            "chroma_true": round(chroma(x), 4),
            "chroma_recon": round(chroma(xh), 4),
        }
    )
)
if len(sys.argv) > 2:
    from fastdae.training.logs import save_grid

    save_grid(torch.cat([x[:16], xh[:16]]), sys.argv[2], nrow=16)
