"""The default autoencoder (ch 16) on solid-colour 32x32 images: how fast does it learn 3 numbers?

    solid_colour.py BOTTLENECK full|half [none]     (second pass)
    VARIANT=det,lindec,... solid_colour.py kl full    (third pass)

BOTTLENECK vq | kl; `half` puts a dark background on the left half; `none` drops the normalisation.
Env: LR (2e-3), BETAS ((0.5, 0.9)), STEPS (301), VARIANT, comma-separated:
  det     the KL bottleneck returns its mean (no sampling noise)
  linenc  the encoder is one 4x4 stride-4 conv; lindec  the decoder is one 4x4 stride-4 transposed conv
  linear  both (a 2-layer linear autoencoder)
  mse     MSE instead of L1
Prints, every 100 steps, the L1 and the error of the mean colour on 256 fresh images (right half)."""

import os
import sys

import torch
from torch import nn

torch.set_num_threads(1)
torch.manual_seed(0)
import fastdae.models.autoencoder as A  # noqa: E402

if len(sys.argv) > 3 and sys.argv[3] == "none":
    A._norm = lambda c: torch.nn.Identity()
from fastdae.models.autoencoder import Autoencoder, AutoencoderConfig, build_decoder  # noqa: E402

variant = set(os.environ.get("VARIANT", "").split(","))
if "det" in variant:
    A.KLBottleneck.forward = lambda self, h: (h.chunk(2, 1)[0], h.sum() * 0)
ae = AutoencoderConfig(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, num_codes=128, bottleneck=sys.argv[1])
m = Autoencoder(ae, build_decoder(ae))
if variant & {"linenc", "linear"}:
    m.encoder = nn.Conv2d(3, 4 * A.KLBottleneck.in_factor if sys.argv[1] == "kl" else 4, 4, stride=4)
if variant & {"lindec", "linear"}:
    m.decoder = nn.ConvTranspose2d(4, 3, 4, stride=4)
opt = torch.optim.Adam(
    m.parameters(), lr=float(os.environ.get("LR", 2e-3)), betas=eval(os.environ.get("BETAS", "(0.5, 0.9)"))
)


def batch(n):
    c = torch.rand(n, 3, 1, 1) * 1.1 - 0.1  # colour in [-0.1, 1] as the shapes'
    x = c.expand(n, 3, 32, 32).clone()
    if sys.argv[2] == "half":  # dark background on the left half
        x[..., :16] = -0.8
    return x


for step in range(int(os.environ.get("STEPS", 301))):
    x = batch(16)
    xh, aux = m(x)
    loss = ((x - xh) ** 2 if "mse" in variant else (x - xh).abs()).mean() + aux
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    if step % 100 == 0:
        with torch.no_grad():
            m.eval()
            x = batch(256)
            xh, _ = m(x)
            m.train()

            def col(t):
                return t[..., 16:].mean((2, 3))

            print(
                step,
                "l1",
                round((x - xh).abs().mean().item(), 4),
                "colour err",
                round((col(x) - col(xh)).abs().mean().item(), 4),
                "chroma rec",
                round((col(xh) - col(xh).mean(1, keepdim=True)).abs().mean().item(), 4),
                "true",
                round((col(x) - col(x).mean(1, keepdim=True)).abs().mean().item(), 4),
                flush=True,
            )
