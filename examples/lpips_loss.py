"""fastdae.nn.LPIPS where code calls the lpips package: same constructor and forward, fused head.

    python examples/lpips_loss.py

    loss_fn = lpips.LPIPS(net="vgg")                                   # the lpips package
    loss_fn = fastdae.nn.LPIPS(net="vgg", trunk_weights="vgg16-397923af.pth")   # fastdae: a local
        # torchvision vgg16 file (nothing is downloaded); lin weights from the installed lpips package
    d = loss_fn(x0, x1)                   # (B, 1, 1, 1), x in [-1, 1]; normalize=True for [0, 1]
    d_map = fastdae.nn.LPIPS(net="vgg", spatial=True, ...)(x0, x1)    # (B, 1, H, W)

This example uses pnet_rand=True (a random trunk, as lpips' own flag) so that it runs anywhere;
the numbers are then not perceptual.
"""

import torch
from torch import nn

from fastdae.kernels.lpips import lpips_head_ref
from fastdae.nn import LPIPS


def main() -> None:
    torch.manual_seed(0)
    loss_fn = LPIPS(net="vgg", pnet_rand=True)  # eval mode, frozen VGG16 trunk, lin weights of lpips if installed
    images = torch.rand(4, 3, 32, 32) * 2 - 1  # targets in [-1, 1]
    decoder = nn.Conv2d(3, 3, 3, padding=1)  # stands in for an autoencoder's decoder

    recon = decoder(images)
    rec_loss = (recon - images).abs()  # (B, 3, H, W), as taming's VQLPIPSWithDiscriminator
    loss = (rec_loss + loss_fn(recon, images)).mean()  # (B, 1, 1, 1) broadcasts like lpips' output
    loss.backward()
    print(f"L1 + LPIPS loss {loss.item():.4f}; decoder grad norm {decoder.weight.grad.norm().item():.3e}")

    with torch.no_grad():
        fused = loss_fn(recon, images)  # fused head
        ref = lpips_head_ref(loss_fn.features(recon), loss_fn.features(images), loss_fn.lin_weights)
        spatial = LPIPS(net="vgg", pnet_rand=True, spatial=True)  # per-pixel maps, upsampled as lpips does
        spatial.load_state_dict(loss_fn.state_dict())
        maps = spatial(recon, images)
    print(f"fused head {fused.flatten().tolist()}")
    print(f"reference  {ref.tolist()}")
    print(f"spatial map {tuple(maps.shape)}, its mean {maps.mean(dim=(1, 2, 3)).tolist()}")
    assert fused.shape == (4, 1, 1, 1) and maps.shape == (4, 1, 32, 32)
    assert torch.allclose(fused.flatten(), ref, rtol=1e-4)
    print("ok: fused LPIPS head matches the reference, with lpips' output shapes")


if __name__ == "__main__":
    main()
