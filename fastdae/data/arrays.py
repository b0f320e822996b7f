"""`ArrayDataset`: images from a numpy array, a .npy (memory-mapped) or a .npz file."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fastdae.data.config import (
    FLOAT_RANGE_SLACK,
    HASH_BLOCK_BYTES,
    _to_signed_unit,
)
from fastdae.data.folder_index import ImageFileError, ImageFileTypeError


# ---------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------
class ArrayDataset(Dataset):
    """Images from a numpy array, a .npy file (memory-mapped) or a .npz file (keys `images` and
    optionally `labels`). uint8 images are (N, H, W, 3) HWC in [0, 255]; float images are
    (N, 3, H, W) CHW already in [-1, 1] (checked). `labels` (N,) integers >= 0 override the file's;
    without any, every label is 0. `num_classes` is 1 + the largest label."""

    def __init__(
        self, path_or_array: str | os.PathLike | np.ndarray | Tensor, labels: np.ndarray | Tensor | None = None
    ) -> None:
        source = "array"
        file_labels = None
        if isinstance(path_or_array, Tensor):
            images = path_or_array.detach().cpu().numpy()
        elif isinstance(path_or_array, np.ndarray):
            images = path_or_array
        elif isinstance(path_or_array, (str, os.PathLike)):
            images, file_labels, source = self._load(Path(path_or_array))
        else:
            raise TypeError(f"path_or_array must be a path, numpy array or tensor, got {type(path_or_array).__name__}")
        self.images = self._check_images(images, source)
        if labels is not None:
            file_labels = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        self.labels = self._check_labels(file_labels, len(self.images), source)
        self.num_classes = int(self.labels.max()) + 1  # over every label, not a sample of them
        self.source = source
        chw = self.images.dtype != np.uint8
        h, w = self.images.shape[2:4] if chw else self.images.shape[1:3]
        self.image_size = (int(h), int(w))  # (H, W)

    @staticmethod
    def _load(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
        if not path.is_file():
            raise FileNotFoundError(f"array file {path} does not exist")
        if path.suffix not in (".npy", ".npz"):
            raise ImageFileError(f"array file {path} must end in .npy or .npz")
        try:
            if path.suffix == ".npy":
                return np.load(path, mmap_mode="r", allow_pickle=False), None, path.name
            with np.load(path, allow_pickle=False) as z:
                if "images" not in z.files:
                    raise ImageFileError(f"{path}: an .npz needs an 'images' array, found keys {z.files}")
                return z["images"], (z["labels"] if "labels" in z.files else None), path.name
        except (ValueError, EOFError, zipfile.BadZipFile) as e:  # ImageFileError is a ValueError: kept as it is
            if isinstance(e, ImageFileError):
                raise
            raise ImageFileError(
                f"array file {path} is not a readable {path.suffix} ({type(e).__name__}: {e})"
            ) from None

    @staticmethod
    def _check_images(images: np.ndarray, source: str) -> np.ndarray:
        if images.ndim != 4 or len(images) == 0:
            raise ImageFileError(f"{source}: images must be a non-empty 4-d array, got shape {images.shape}")
        if images.dtype == np.uint8:
            if images.shape[3] != 3:
                raise ImageFileError(f"{source}: uint8 images must be (N, H, W, 3) HWC, got shape {images.shape}")
        elif images.dtype in (np.float16, np.float32, np.float64):
            if images.shape[1] != 3:
                raise ImageFileError(f"{source}: float images must be (N, 3, H, W) CHW, got shape {images.shape}")
            lo, hi = float(np.min(images)), float(np.max(images))
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1 - FLOAT_RANGE_SLACK or hi > 1 + FLOAT_RANGE_SLACK:
                raise ImageFileError(f"{source}: float images must lie in [-1, 1], found range [{lo}, {hi}]")
        else:
            raise ImageFileTypeError(
                f"{source}: images must be uint8 (N, H, W, 3) or float (N, 3, H, W), got dtype {images.dtype}"
            )
        return images

    @staticmethod
    def _check_labels(labels: np.ndarray | None, n: int, source: str) -> np.ndarray:
        if labels is None:
            return np.zeros(n, dtype=np.int64)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ImageFileError(
                f"{source}: labels must be an integer array of shape ({n},), got {labels.dtype} {labels.shape}"
            )
        if labels.min() < 0:
            raise ImageFileError(f"{source}: labels must be >= 0 (class indices), found {labels.min()}")
        return labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def identity(self) -> dict[str, Any]:
        """Source name, shape, dtype and the sha256 of every element's bytes (hashed in row blocks of
        about HASH_BLOCK_BYTES, so a memory-mapped .npy is read once and never held whole)."""
        return {
            "source": self.source,
            "shape": list(self.images.shape),
            "dtype": str(self.images.dtype),
            "sha256": self._content_sha256(),
            "labels_sha256": hashlib.sha256(self.labels.tobytes()).hexdigest(),
        }

    def _content_sha256(self) -> str:
        h = hashlib.sha256()
        rows = max(1, HASH_BLOCK_BYTES // max(1, self.images[0].nbytes))
        for start in range(0, len(self.images), rows):
            h.update(np.ascontiguousarray(self.images[start : start + rows]).data)  # a view when already contiguous
        return h.hexdigest()

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        image = _to_signed_unit(x) if x.dtype == np.uint8 else torch.from_numpy(np.array(x, dtype=np.float32))
        return image, torch.tensor(self.labels[i], dtype=torch.int64)
