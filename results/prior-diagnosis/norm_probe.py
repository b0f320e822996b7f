"""Does the autoencoder's GroupNorm lose colour? At ch=16 the current rule (gcd(32, channels) groups)
gives one channel per group at every width of the default preset (16 and 32 channels): instance norm,
which removes each channel's per-image mean and scale, so a decoder whose last layers see only
normalised features cannot tell a bright red square from a dim grey one.

Trains the default preset's autoencoder (VQ, full decoder, L1 + VQ loss, Adam 4e-4 (0.5, 0.9), batch 16,
no GAN) for STEPS steps with each grouping rule, same seed, and reports on 256 held-out images
(ProceduralShapes seed 1): PSNR and the error of each image's mean colour.

usage: python results/prior-diagnosis/norm_probe.py OUT_JSON STEPS"""

import math
import sys

import torch
from common import Timer, dump
from torch import nn

import fastdae.models.autoencoder as A
from fastdae import measure as M
from fastdae.config import preset
from fastdae.data import ProceduralShapes

RULES = {
    "gcd(32,C) [old]": lambda c: math.gcd(32, c),
    "gcd(32,C//4) [>=4 ch/group]": lambda c: math.gcd(32, max(1, c // 4)),
}
out, steps = sys.argv[1], int(sys.argv[2])
cfg = preset("default")
train = ProceduralShapes(4096, 32, 0)
x_eval, _ = ProceduralShapes(256, 32, 1).images(list(range(256)))
res = {}
for name, groups in RULES.items():
    A._norm = lambda c, groups=groups: nn.GroupNorm(groups(c), c, eps=1e-6)
    torch.manual_seed(0)
    ae = A.Autoencoder(cfg.autoencoder, A.build_decoder(cfg.autoencoder))
    opt = torch.optim.Adam(ae.parameters(), lr=4e-4, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(0)
    with Timer() as tm:
        for _ in range(steps):
            x, _ = train.images(torch.randint(0, 4096, (16,), generator=g).numpy())
            x_hat, aux = ae(x)
            loss = (x - x_hat).abs().mean() + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    ae.eval()
    with torch.no_grad():
        x_hat = torch.cat([ae(c)[0] for c in x_eval.split(64)]).clamp(-1, 1)
    res[name] = {
        "steps": steps,
        "train_s": tm.s,
        "psnr": M.psnr(x_eval, x_hat).mean().item(),
        "mean_colour_abs_err": (x_eval.mean((2, 3)) - x_hat.mean((2, 3))).abs().mean().item(),
        "groups_at_16_32": [groups(16), groups(32)],
    }
    print(name, res[name], flush=True)
dump(out, res)
