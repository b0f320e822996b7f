"""How fast can the default autoencoder learn colour and shape? Trains the default preset's
autoencoder (VQ, full decoder, L1 + VQ loss, Adam (0.5, 0.9), batch 16, no GAN) with the GroupNorm
rule of fastdae.models.autoencoder as it is in the tree, for STEPS steps at learning rate LR and width
CH, and reports PSNR and the per-image mean-colour error on 256 held-out images (ProceduralShapes seed 1),
plus a reconstruction grid (top: real, bottom: reconstructed).

usage: python results/prior-diagnosis/ae_probe.py OUT_JSON STEPS LR CH [vq|kl]"""

import sys

import torch
from common import Timer, dump

import fastdae.models.autoencoder as A
from fastdae import measure as M
from fastdae.config import preset
from fastdae.data import ProceduralShapes
from fastdae.train.loop import save_grid

out, steps, lr, ch = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
bottleneck = sys.argv[5] if len(sys.argv) > 5 else "vq"
cfg = preset("default")
cfg.autoencoder.ch = ch
cfg.autoencoder.bottleneck = bottleneck
train = ProceduralShapes(4096, 32, 0)
x_eval, _ = ProceduralShapes(256, 32, 1).images(list(range(256)))
torch.manual_seed(0)
ae = A.Autoencoder(cfg.autoencoder, A.build_decoder(cfg.autoencoder))
opt = torch.optim.Adam(ae.parameters(), lr=lr, betas=(0.5, 0.9))
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
save_grid(torch.cat([x_eval[:8], x_hat[:8]]), out.replace(".json", ".png"), nrow=8)
dump(
    out,
    {
        "steps": steps,
        "lr": lr,
        "ch": ch,
        "bottleneck": bottleneck,
        "train_s": tm.s,
        "psnr": M.psnr(x_eval, x_hat).mean().item(),
        "mean_colour_abs_err": (x_eval.mean((2, 3)) - x_hat.mean((2, 3))).abs().mean().item(),
    },
)
