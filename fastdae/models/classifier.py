"""A small CNN classifier trained by fastdae on the dataset itself: the feature space of "FD-feat"
(a Fréchet distance that is *not* FID) and the judge of the validity and class accuracy of samples.

    clf = train_classifier(ProceduralShapes(8192, seed=1), steps=600)
    logits = clf(images)             # (B, num_classes), images (B, 3, H, W) in [-1, 1]
    feats = clf.features(images)     # (B, feature_dim) penultimate activations
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler


def _conv(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]


class ShapeClassifier(nn.Module):
    """Three stages of (3x3 conv, 3x3 stride-2 conv) at widths w, 2w, 4w, global average pool, then a
    ReLU linear layer of `feature_dim` (the features) and the logits layer. Any input size >= 8."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        if num_classes < 2 or width < 1 or feature_dim < 1:
            raise ValueError(
                f"ShapeClassifier: num_classes >= 2, width >= 1, feature_dim >= 1 needed, got "
                f"{num_classes}, {width}, {feature_dim}"
            )
        self.num_classes, self.feature_dim = num_classes, feature_dim
        widths = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += _conv(c, w, 1) + _conv(w, w, 2)  # each stage halves H and W
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, feature_dim): the space FD-feat measures distances in."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_classifier(
    dataset: Dataset,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 32,
    feature_dim: int = 128,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ShapeClassifier:
    """Adam on cross-entropy for `steps` batches drawn with replacement (seeded); returns the model
    in eval mode. `num_classes` defaults to `dataset.num_classes`."""
    num_classes = num_classes if num_classes is not None else getattr(dataset, "num_classes", None)
    if num_classes is None:
        raise ValueError("train_classifier: pass num_classes (the dataset has no num_classes attribute)")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_classifier: steps and batch_size must be >= 1, got {steps}, {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG stream
        torch.manual_seed(seed)
        model = ShapeClassifier(num_classes, width=width, feature_dim=feature_dim).to(device)
    sampler = RandomSampler(dataset, replacement=True, num_samples=steps * batch_size, generator=gen)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for images, labels in loader:
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on every item of `dataset` (eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    return correct / total
