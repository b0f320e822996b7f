"""DDPM (eps prediction) on the pattern set of dit_probe.py at the DiT test size.
Usage: python ddpm_pattern.py STEPS linear|cosine.
Prints the loss and, per sampler and step count, the nearest-pattern class accuracy, the rms distance to
the own pattern and the sample std."""

import sys

import torch

torch.set_num_threads(1)
from fastdae.models.diffusion import make_diffusion  # noqa: E402
from fastdae.models.dit import DiT  # noqa: E402

torch.manual_seed(0)
patterns = torch.randn(4, 4, 4, 4)
steps = int(sys.argv[1])
schedule = sys.argv[2]
model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=4)
diffusion = make_diffusion("ddpm", schedule)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(0)
for i in range(steps):
    y = torch.randint(0, 4, (32,), generator=g)
    x0 = patterns[y] + 0.1 * torch.randn(32, 4, 4, 4, generator=g)
    loss = diffusion.loss(model, x0, y, generator=g)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if i % 100 == 0:
        print(i, loss.item())
model.eval()
y = torch.arange(32) % 4
for sampler in ("ddim", "ddpm"):
    for st in (20, 100):
        x = diffusion.sample(
            model, (32, 4, 4, 4), y=y, steps=st, sampler=sampler, generator=torch.Generator().manual_seed(1)
        )
        d = torch.cdist(x.flatten(1), patterns.flatten(1))
        print(
            sampler,
            st,
            "acc",
            (d.argmin(1) == y).float().mean().item(),
            "rms",
            (d[torch.arange(32), y] ** 2 / 64).mean().sqrt().item(),
            "std",
            x.std().item(),
        )
