"""`ImageFolder`: images (PNG, JPEG, WebP) under a root, one subfolder per class or none."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fastdae.data.config import (
    CROPS,
    _to_signed_unit,
)
from fastdae.data.folder_index import STAT_CHUNK, FolderIndex, ImageFileError

__all__ = ["ImageFileError", "ImageFolder", "open_rgb8", "read_rgb8", "to_rgb8"]


# Pillow's modes for 16-bit (and 32-bit integer) greyscale: a 16-bit PNG opens as one of them, and
# convert("RGB") clips its 0..65535 samples at 255, which turns nearly every pixel white
WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb8(im: Any) -> Any:
    """A Pillow image as 8-bit RGB: 16-bit greyscale scaled to 0..255 (x / 257, rounded), not clipped."""
    from PIL import Image

    if im.mode in WIDE_GREY_MODES:
        wide = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def open_rgb8(path: Path) -> Any:
    """The image at `path` decoded to 8-bit RGB (to_rgb8); any failure is an ImageFileError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return to_rgb8(im)
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError...
        raise ImageFileError(f"cannot read image file {path}: {type(e).__name__}: {e}") from None


def read_rgb8(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 pixels of the image at `path` (open_rgb8)."""
    return np.array(open_rgb8(path))  # writable (torch.from_numpy warns on a read-only array)


class ImageFolder(Dataset):
    """Images (PNG, JPEG, WebP) under `root`, read with Pillow and converted to RGB, as size x size.

    Layout: either images directly in `root` (label 0 for all), or one subfolder per class
    (`root/<class>/**/*.png`, labels by sorted class name; `classes` lists them); not both. Names
    starting with "." are skipped. The file list comes from a cached FolderIndex (see
    `FolderIndex.cached`): construction opens no image and, on a cache hit, stats only directories.
    Any aspect ratio: with `resize=True` the shorter side is resized to `size` (bicubic), then a
    size x size window is cut ("center" or "random" `crop`); with `resize=False` the window is cut
    from the image as is (which must be at least size x size). `flip` mirrors half the images
    left-right. Random draws use torch's generator (seeded per DataLoader worker by torch).
    Unreadable or too small files raise an ImageFileError (a ValueError) naming the file when they
    are loaded; 16-bit greyscale PNGs are scaled to 8 bits (to_rgb8), not clipped.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int,
        resize: bool = True,
        crop: str = "center",
        flip: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"ImageFolder: size must be a positive int, got {size!r}")
        if crop not in CROPS:
            raise ValueError(f"ImageFolder: crop must be one of {CROPS}, got {crop!r}")
        self.size, self.resize, self.crop, self.flip = size, resize, crop, flip
        self.index = FolderIndex.cached(self.root, Path(cache_dir) if cache_dir is not None else None)
        self.classes, self.labels = self.index.classes, self.index.labels
        self.num_classes = max(1, len(self.classes))  # images directly in root: one class, label 0
        self.image_size = (size, size)  # (H, W)

    def __len__(self) -> int:
        return len(self.index)

    def path(self, i: int) -> Path:
        return self.root / self.index.name(i)

    def identity(self) -> dict[str, Any]:
        """Settings plus a sha256 over every file's (relative name, st_size, st_mtime_ns, st_ctime_ns,
        st_ino), stat'ed now: any write changes mtime and ctime, a rename (two files swapped) changes
        the names' inodes and ctimes. A moved folder keeps it; a copy (even cp -a) changes it."""
        h = hashlib.sha256()
        blob, root = self.index.names.tobytes(), os.fsencode(self.root.resolve())
        for start in range(0, len(self), STAT_CHUNK):  # bytes paths and chunked offsets: ~10 us per file
            offsets = self.index.offsets[start : start + STAT_CHUNK + 1].tolist()
            for a, b in zip(offsets[:-1], offsets[1:], strict=True):
                name = blob[a:b]
                try:
                    st = os.stat(root + b"/" + name)
                except OSError as e:  # the folder changed between its index and this stat
                    raise ImageFileError(
                        f"image folder {self.root} changed while it was read: {name.decode()}: {e.strerror}; run again"
                    ) from None
                h.update(b"%s\0%d\0%d\0%d\0%d\n" % (name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        return {
            "classes": self.classes,
            "size": self.size,
            "resize": self.resize,
            "crop": self.crop,
            "flip": self.flip,
            "files": h.hexdigest(),
            "version": 2,
        }

    def _window(self, w: int, h: int) -> tuple[int, int]:
        """Top-left corner (left, top) of the size x size window in a w x h image."""
        if self.crop == "random":
            return int(torch.randint(w - self.size + 1, ())), int(torch.randint(h - self.size + 1, ()))
        return (w - self.size) // 2, (h - self.size) // 2

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        path, s = self.path(i), self.size
        im = open_rgb8(path)
        if self.resize and min(im.width, im.height) != s:
            scale = s / min(im.width, im.height)
            wh = (max(s, round(im.width * scale)), max(s, round(im.height * scale)))
            im = im.resize(wh, Image.Resampling.BICUBIC)
        if min(im.width, im.height) < s:
            raise ImageFileError(
                f"image {path} is {im.width}x{im.height}, smaller than size {s}x{s}; "
                f"pass resize=True (DataConfig.resize) to resize it"
            )
        left, top = self._window(im.width, im.height)
        if (im.width, im.height) != (s, s):
            im = im.crop((left, top, left + s, top + s))
        image = _to_signed_unit(np.asarray(im))  # (3, s, s)
        if self.flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        return image, torch.tensor(int(self.labels[i]), dtype=torch.int64)
