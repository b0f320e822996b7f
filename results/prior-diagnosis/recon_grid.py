"""Top row: 16 held-out images; bottom: their reconstructions through a run's final decoder.

usage: recon_grid.py RUN OUT.png"""
import sys, numpy as np, torch
from fastdae.training.run import Run
from fastdae.training.checkpoint import load_weights
from fastdae.data import build_dataset, split_dataset
from fastdae.cache.format import gather_images
from fastdae.models.autoencoder import build_encoder
from fastdae.training.logs import save_grid
r = Run.open(sys.argv[1])
enc = build_encoder(r.cfg.autoencoder); load_weights(r.encoder_file, enc, prefix="encoder."); enc.eval()
bott = r.frozen_bottleneck()
dec = r.build_decoder(); load_weights(r.decoder_file(r.final_decoder_stage), dec); dec.eval()
_, held = split_dataset(build_dataset(r.cfg.data), r.cfg.data)
x, y = gather_images(held, np.arange(16))
with torch.no_grad():
    xh = dec(bott.encode_fields(enc(x))[1]).clamp(-1, 1)
save_grid(torch.cat([x, xh]), sys.argv[2], nrow=16)
