import torch, sys
torch.set_num_threads(1); torch.manual_seed(0)
import fastdae.models.autoencoder as A
if len(sys.argv) > 3 and sys.argv[3] == "none": A._norm = lambda c: torch.nn.Identity()
from fastdae.models.autoencoder import AutoencoderConfig, Autoencoder, build_decoder
ae = AutoencoderConfig(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, num_codes=128, bottleneck=sys.argv[1])
m = Autoencoder(ae, build_decoder(ae))
import os
opt = torch.optim.Adam(m.parameters(), lr=float(os.environ.get("LR", 2e-3)), betas=eval(os.environ.get("BETAS", "(0.5, 0.9)")))
def batch(n):
    c = torch.rand(n, 3, 1, 1) * 1.1 - 0.1  # colour in [-0.1, 1] as the shapes'
    x = c.expand(n, 3, 32, 32).clone()
    if sys.argv[2] == "half":  # dark background on the left half
        x[..., :16] = -0.8
    return x
for step in range(301):
    x = batch(16); xh, aux = m(x); loss = (x - xh).abs().mean() + aux
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    if step % 100 == 0:
        with torch.no_grad():
            m.eval(); x = batch(256); xh, _ = m(x); m.train()
            col = lambda t: t[..., 16:].mean((2, 3))
            print(step, "l1", round((x - xh).abs().mean().item(), 4), "colour err", round((col(x) - col(xh)).abs().mean().item(), 4),
                  "chroma rec", round((col(xh) - col(xh).mean(1, keepdim=True)).abs().mean().item(), 4),
                  "true", round((col(x) - col(x).mean(1, keepdim=True)).abs().mean().item(), 4), flush=True)
