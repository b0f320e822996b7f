"""LPIPS as a training loss with fastdae's fused head.

    python examples/lpips_loss.py

Real use loads local weights (nothing is downloaded):
    LPIPS(trunk_weights="vgg16-397923af.pth")   # torchvision's vgg16 state dict; lin weights from the
                                                # installed lpips package (pip install --no-deps lpips==0.1.4)
This example uses random_init=True so that it runs anywhere; the numbers are then not perceptual.
"""
import torch
from torch import nn

from fastdae.kernels.lpips import lpips_head_ref
from fastdae.nn import LPIPS


def main() -> None:
    torch.manual_seed(0)
    lpips = LPIPS(random_init=True)  # frozen VGG16 trunk + fused head
    images = torch.rand(4, 3, 32, 32) * 2 - 1  # targets in [-1, 1]
    decoder = nn.Conv2d(3, 3, 3, padding=1)  # stands in for an autoencoder's decoder

    recon = decoder(images)
    loss = (recon - images).abs().mean() + lpips.loss(recon, images).mean()  # L1 + LPIPS; targets under no_grad
    loss.backward()
    print(f"L1 + LPIPS loss {loss.item():.4f}; decoder grad norm {decoder.weight.grad.norm().item():.3e}")

    # the fused head against the plain-torch reference on the same VGG features
    with torch.no_grad():
        f0, f1 = lpips.features(recon), lpips.features(images)
        fused, ref = lpips(recon, images), lpips_head_ref(f0, f1, lpips.lin_weights)
    print(f"fused head {fused.tolist()}")
    print(f"reference  {ref.tolist()}")
    assert torch.allclose(fused, ref, rtol=1e-4)
    print("ok: fused LPIPS head matches the reference")


if __name__ == "__main__":
    main()
