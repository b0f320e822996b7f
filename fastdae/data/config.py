"""DataConfig (what the `data:` section of a run config holds), the dataset names, the one pixel
convention every dataset shares (images float32 (3, H, W) in [-1, 1]) and the protocols that type it
(MapDataset, ImageDataset, LabeledDataset) and DataError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

DATASETS = ("shapes", "textures", "folder", "array")
PROCEDURAL = ("shapes", "textures")  # generated from DataConfig.seed, no root
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CROPS = ("center", "random")
FLOAT_RANGE_SLACK = 1e-3  # float arrays must lie in [-1 - slack, 1 + slack]
HASH_BLOCK_BYTES = 1 << 26  # arrays are hashed in blocks of rows of about 64 MiB
HOLDOUT_FRACTION = 0.1  # folder / array default: a tenth of each class is held out of training
# procedural default: items generated past the training range (they cost the training set nothing);
# enough for the judge's default parts (512 evaluation + 8192 classifier images + the sample-count floor)
PROCEDURAL_HOLDOUT = 16384


class DataError(ValueError):
    """The user's data cannot be used as configured (e.g. a holdout that leaves nothing to train on,
    an unreadable image file: ImageFileError): the command line reports it in one line, not as a bug."""


@dataclass
class DataConfig:
    """Which dataset to train on. `root` is the folder ("folder") or the .npy/.npz file ("array");
    `size` is the training resolution (square); `num_samples` and `seed` configure the procedural
    datasets (PROCEDURAL): "shapes" (ProceduralShapes, 4 classes) and "textures" (ProceduralTextures,
    5 classes of periodic texture: fine detail over the whole image, unlike the shapes).
    "folder" only: `resize` resizes the shorter side to `size` (else images are cropped as they are,
    and must be at least size x size), `crop` cuts the size x size window ("center" or "random"),
    `flip` mirrors half the images left-right.
    `holdout`: the items held out of training for evaluation (see `split_dataset`): a fraction in
    (0, 1) of the dataset (of each class) or a whole count >= 1; None: HOLDOUT_FRACTION of a folder or
    array, PROCEDURAL_HOLDOUT generated items for a procedural dataset. `seed` seeds the split too."""

    name: str = "shapes"
    root: str | None = None
    size: int = 32
    num_samples: int = 8192
    seed: int = 0
    resize: bool = True
    crop: str = "center"
    flip: bool = False
    holdout: float | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"DataConfig.name must be one of {DATASETS}, got {self.name!r}")
        if self.size < 1 or self.num_samples < 1:
            raise ValueError(f"DataConfig.size and num_samples must be >= 1, got {self.size}, {self.num_samples}")
        if self.crop not in CROPS:
            raise ValueError(f"DataConfig.crop must be one of {CROPS}, got {self.crop!r}")
        if self.name != "folder" and (self.crop != "center" or self.flip):
            raise ValueError(f"DataConfig.crop and flip apply to name='folder' only, got name={self.name!r}")
        h = self.holdout
        if h is not None and not (0 < h < 1 or (h >= 1 and float(h).is_integer())):
            raise ValueError(f"DataConfig.holdout must be a fraction in (0, 1) or a whole count >= 1, got {h!r}")

    def require_root(self, key: str = "DataConfig.root") -> str:
        """The root of a folder / array dataset; ValueError naming `key` when it is not set."""
        if not self.root:
            raise ValueError(
                f"{key} is required for data.name={self.name!r}: the folder of images (one subfolder per "
                f"class) or the .npy/.npz file, e.g. --data.root /datasets/imagenet/train"
            )
        return self.root

    def holdout_count(self, n: int) -> int:
        """Items held out of a dataset of n items (procedural: n = num_samples; see split_dataset)."""
        h = (
            self.holdout
            if self.holdout is not None
            else PROCEDURAL_HOLDOUT
            if self.name in PROCEDURAL
            else HOLDOUT_FRACTION
        )
        return round(h * n) if h < 1 else int(h)


class MapDataset(Protocol):
    """A map-style dataset of (image float32 (3, H, W) in [-1, 1], label int64 scalar) items: what the
    latent cache reads. torch's Dataset does not declare __len__, this does."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]: ...


class ImageDataset(MapDataset, Protocol):
    """What training reads of a dataset: its items, `num_classes` (over the whole dataset) and
    `image_size` (H, W). Every fastdae dataset is one."""

    @property
    def num_classes(self) -> int: ...

    @property
    def image_size(self) -> tuple[int, int]: ...


class LabeledDataset(ImageDataset, Protocol):
    """An ImageDataset with every item's label up front, `labels` (N,) ints: what split_dataset
    stratifies by (a folder, an array, a part of one; the procedural datasets generate theirs)."""

    @property
    def labels(self) -> np.ndarray: ...


def _to_signed_unit(rgb_uint8: np.ndarray) -> Tensor:
    """(..., H, W, 3) uint8 -> float32 (..., 3, H, W) in [-1, 1]."""
    x = np.ascontiguousarray(np.moveaxis(rgb_uint8, -1, -3), dtype=np.float32)  # a writable copy
    return torch.from_numpy(x).div_(127.5).sub_(1.0)
