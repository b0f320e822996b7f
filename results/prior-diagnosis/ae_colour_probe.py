"""Stage 1 (mode control: full decoder) at the default preset with another normalisation or colour
handling; colour error, and OUT/recon.png (top: 8 held-out images, bottom: reconstructions).

    ae_colour_probe.py VARIANT OUT [dotted overrides]
VARIANT: gn4 (the code as it is), gn1, gn8, none (normalisation); third pass: det (KL returns its mean),
pca (the autoencoder sees and outputs colours in the data's whitened PCA colour basis, loss in RGB),
wloss (the L1 taken in the whitened colour basis instead of RGB)."""

import json
import math
import sys

import numpy as np
import torch
from torch import nn

import fastdae.models.autoencoder as A

variant, out = sys.argv[1], sys.argv[2]
extra = sys.argv[3:]
if variant == "gn1":
    A._norm = lambda c: nn.GroupNorm(1, c, eps=1e-6)
elif variant == "none":
    A._norm = lambda c: nn.Identity()
elif variant == "gn8":
    A._norm = lambda c: nn.GroupNorm(math.gcd(32, max(1, c // 8)), c, eps=1e-6)
elif variant == "det":
    A.KLBottleneck.forward = lambda self, h: (h.chunk(2, 1)[0], h.sum() * 0)
import fastdae  # noqa: E402
from fastdae.cache.format import gather_images  # noqa: E402
from fastdae.config import apply_overrides, preset  # noqa: E402
from fastdae.data import build_dataset, split_dataset  # noqa: E402
from fastdae.training.checkpoint import load_weights  # noqa: E402

cfg = apply_overrides(
    preset("default"), [f"out_dir={out}", "stages=stage1", "mode=control", "progress=false", "overwrite=true", *extra]
)
if variant in ("pca", "wloss"):  # the training images' pixel colour statistics: mean, eigenvalues e, eigenvectors V
    pix = gather_images(split_dataset(build_dataset(cfg.data), cfg.data)[0], np.arange(512))[0]
    pix = pix.permute(0, 2, 3, 1).reshape(-1, 3).double()
    mu, (e, V) = pix.mean(0).float(), torch.linalg.eigh(torch.cov(pix.T))
    white = (torch.diag(e.rsqrt()) @ V.T).float()  # rows: PCA axes scaled to unit variance

    def rgb(W, t):
        return torch.einsum("ij,bjhw->bihw", W, t)

    if variant == "pca":
        enc_f, dec_f, unwhite = A.Encoder.forward, A.Decoder.forward, (V @ torch.diag(e.sqrt())).float()
        A.Encoder.forward = lambda self, x: enc_f(self, rgb(white, x - mu[:, None, None]))
        A.Decoder.forward = lambda self, z: rgb(unwhite, dec_f(self, z)) + mu[:, None, None]
    else:
        import fastdae.models.losses as L

        gl, W = L.AutoencoderLoss.generator_loss, white / white.abs().sum() * 3
        L.AutoencoderLoss.generator_loss = lambda self, x, xh, *a, **k: gl(self, rgb(W, x), rgb(W, xh), *a, **k)
res = fastdae.train(cfg)
ae = cfg.autoencoder
enc, bott, dec = A.build_encoder(ae), A.build_bottleneck(ae), A.build_decoder(ae)
load_weights(res.run_dir / "stage1/encoder.safetensors", enc, prefix="encoder.")
load_weights(res.run_dir / "stage1/encoder.safetensors", bott, prefix="bottleneck.")
load_weights(res.run_dir / "stage1/decoder.safetensors", dec)
_, held = split_dataset(build_dataset(cfg.data), cfg.data)
x, y = gather_images(held, np.arange(256))
with torch.no_grad():
    for m in (enc, bott, dec):
        m.eval()
    z = bott.encode_fields(enc(x))[1]
    xh = dec(z).clamp(-1, 1)
mse = ((xh - x) ** 2).mean((1, 2, 3))
psnr = (10 * torch.log10(4 / mse)).mean().item()
# colour of the brightest pixels (the shapes): mean over pixels whose true brightness is in the top 20%
b = x.mean(1, keepdim=True)
thr = b.flatten(1).quantile(0.8, dim=1)[:, None, None, None]
mask = (b >= thr).float()


def col(t):
    return (t * mask).sum((2, 3)) / mask.sum((2, 3))


cerr = (col(xh) - col(x)).abs().mean().item()


def chroma(t):
    return (col(t) - col(t).mean(1, keepdim=True)).abs().mean().item()


print(
    json.dumps(
        {
            "variant": variant,
            "extra": extra,
            "psnr": round(psnr, 2),
            "shape_colour_err": round(cerr, 4),
            "chroma_true": round(chroma(x), 4),
            "chroma_recon": round(chroma(xh), 4),
            "stage1_s": round(res.metrics["stages"]["stage1"]["wall_s"], 1),
        }
    )
)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

grid = torch.cat([torch.cat(list(x[:8]), 2), torch.cat(list(xh[:8]), 2)], 1) * 0.5 + 0.5
plt.imsave(f"{out}/recon.png", np.kron(grid.clamp(0, 1).permute(1, 2, 0).numpy(), np.ones((3, 3, 1))))
