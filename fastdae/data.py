"""Datasets: the procedural default (no download), image folders, and numpy arrays.

Every dataset returns `(image, label)` with image float32 (3, H, W) in [-1, 1] and label an int64
scalar tensor, and defines `identity() -> dict` (what configures it), which `dataset_fingerprint`
hashes together with a few sampled items; the latent cache stores that fingerprint in its manifest.

    ds = build_dataset(DataConfig())            # 8192 procedural 32x32 shape images
    ds = build_dataset(DataConfig(name="folder", root="imgs/", size=64, resize=True))
    ds = build_dataset(DataConfig(name="array", root="faces.npz", size=64))
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

DATASETS = ("shapes", "folder", "array")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FLOAT_RANGE_SLACK = 1e-3  # float arrays must lie in [-1 - slack, 1 + slack]


@dataclass
class DataConfig:
    """Which dataset to train on. `root` is the folder ("folder") or the .npy/.npz file ("array");
    `size` is the training resolution (square); `num_samples` and `seed` configure "shapes";
    `resize` lets "folder" resize (shorter side) and centre-crop images of any size to `size`."""

    name: str = "shapes"
    root: str | None = None
    size: int = 32
    num_samples: int = 8192
    seed: int = 0
    resize: bool = False

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"DataConfig.name must be one of {DATASETS}, got {self.name!r}")
        if self.name != "shapes" and not self.root:
            raise ValueError(f"DataConfig.root is required for name={self.name!r} (a folder or .npy/.npz file)")
        if self.size < 1 or self.num_samples < 1:
            raise ValueError(f"DataConfig.size and num_samples must be >= 1, got {self.size}, {self.num_samples}")


def _to_signed_unit(rgb_uint8: np.ndarray) -> Tensor:
    """(..., H, W, 3) uint8 -> float32 (..., 3, H, W) in [-1, 1]."""
    x = np.ascontiguousarray(np.moveaxis(rgb_uint8, -1, -3), dtype=np.float32)  # a writable copy
    return torch.from_numpy(x).div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# Procedural shapes
# ---------------------------------------------------------------------------------------------
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64 increment (2^64 / golden ratio)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al., 2014) on uint64 arrays; wraps mod 2^64."""
    x = x ^ (x >> 30)
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> 27)
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> 31)


def _uniforms(seed: int, indices: np.ndarray, n: int) -> np.ndarray:
    """Counter-based random numbers: (B, n) float64 in [0, 1), a pure function of (seed, index, k).

    Item i's numbers are draws k = 1..n of a SplitMix64 stream keyed by hash(seed, i), so an item
    never depends on which other items are generated with it or in what order."""
    seed_key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GAMMA)
    keys = _splitmix64(seed_key ^ _splitmix64(indices.astype(np.uint64) * _GAMMA))  # (B,)
    counters = np.arange(1, n + 1, dtype=np.uint64) * _GAMMA  # (n,)
    bits = _splitmix64(keys[:, None] + counters[None, :])  # (B, n)
    return (bits >> 11).astype(np.float64) * 2.0**-53  # top 53 bits -> exact doubles in [0, 1)


class ProceduralShapes(Dataset):
    """size x size RGB images of 1-3 coloured shapes (circle, square, triangle, cross) on a plain
    dark background; the label is the type of the first shape, which is the largest and drawn on top.

    Item i is a pure function of (seed, i) (counter-based hashing, see `_uniforms`), and batches are
    rendered with vectorised numpy (`__getitems__`, used by torch's DataLoader): 8192 images take
    about a second. Every shape lies inside the image; edges are anti-aliased over one pixel.

    `describe(i)` gives the ground truth of item i, for validity checks of generated samples:
        {"label": int, "background": (r, g, b),
         "shapes": [{"type": "circle", "label": 0, "center": (x, y), "radius": r, "color": (r, g, b)}, ...]}
    shapes[0] is the labelled one; later shapes are drawn under it. Colours are in [0, 1]; positions
    in pixels, x right and y down from the top-left corner, pixel centres at +0.5. Each shape is
    inscribed in the disc of `radius` about `center`: circle radius r; axis-aligned square of half-side
    0.75 r; upward equilateral triangle with circumradius r; plus-shaped cross of arm half-length r and
    half-width 0.3 r. Shape colours are in [0.45, 1], the background in [0, 0.3], per channel.
    """

    classes = ("circle", "square", "triangle", "cross")
    num_classes = len(classes)
    max_shapes = 3
    # per item: 3 background channels, 1 shape count, then per shape slot: type, x, y, radius, r, g, b
    _SLOT = 7
    _DRAWS = 4 + max_shapes * _SLOT

    def __init__(self, num_samples: int, size: int = 32, seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels for shapes to be recognisable, got {size}")
        self.num_samples, self.size, self.seed = int(num_samples), int(size), int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def identity(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "size": self.size, "seed": self.seed, "version": 1}

    def _check_indices(self, indices: np.ndarray) -> None:
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"index out of range for ProceduralShapes of length {self.num_samples}")

    def _params(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Shape parameters of a batch: background (B, 3), count (B,), and per slot (B, S) type,
        cx, cy, radius, (B, S, 3) color, (B, S) active."""
        u = _uniforms(self.seed, indices, self._DRAWS)  # (B, D)
        s = self.size
        bg = 0.3 * u[:, 0:3]
        count = 1 + np.minimum((u[:, 3] * self.max_shapes).astype(np.int64), self.max_shapes - 1)
        slots = u[:, 4:].reshape(len(indices), self.max_shapes, self._SLOT)  # (B, S, 7)
        kind = np.minimum((slots[..., 0] * self.num_classes).astype(np.int64), self.num_classes - 1)
        # slot 0 is the largest: radius 0.18-0.32 of the image; others 0.45-0.8 of slot 0's
        r0 = s * (0.18 + 0.14 * slots[:, 0, 3])  # (B,)
        scale = np.concatenate([np.ones_like(r0)[:, None], 0.45 + 0.35 * slots[:, 1:, 3]], axis=1)
        radius = r0[:, None] * scale  # (B, S)
        cx = radius + slots[..., 1] * (s - 2 * radius)  # the disc of `radius` stays inside the image
        cy = radius + slots[..., 2] * (s - 2 * radius)
        color = 0.45 + 0.55 * slots[..., 4:7]  # (B, S, 3)
        active = np.arange(self.max_shapes)[None, :] < count[:, None]  # (B, S)
        return {"bg": bg, "count": count, "kind": kind, "cx": cx, "cy": cy, "radius": radius,
                "color": color, "active": active}

    def _render(self, p: dict[str, np.ndarray]) -> np.ndarray:
        """Parameters of B items -> uint8 (B, H, W, 3)."""
        grid = np.arange(self.size, dtype=np.float32) + 0.5  # pixel centres
        img = np.broadcast_to(p["bg"][:, None, None, :], (len(p["bg"]), self.size, self.size, 3)).astype(np.float32)
        for slot in reversed(range(self.max_shapes)):  # slot 0 last, so it is on top
            r = p["radius"][:, slot, None, None].astype(np.float32)  # (B, 1, 1)
            dx = grid[None, None, :] - p["cx"][:, slot, None, None].astype(np.float32)  # (B, 1, W)
            dy = grid[None, :, None] - p["cy"][:, slot, None, None].astype(np.float32)  # (B, H, 1)
            ax, ay = np.abs(dx), np.abs(dy)
            # signed distances (exact on the boundary, bounds elsewhere): < 0 inside
            circle = np.sqrt(dx * dx + dy * dy) - r
            square = np.maximum(ax, ay) - 0.75 * r
            # equilateral triangle, vertex up: max over edge normals (0, 1), (+-sqrt(3)/2, -1/2) of n.(p - c) - r/2
            triangle = np.maximum(dy, 0.8660254 * ax - 0.5 * dy) - 0.5 * r
            cross = np.minimum(np.maximum(ax - r, ay - 0.3 * r), np.maximum(ay - r, ax - 0.3 * r))
            sdf = np.stack(np.broadcast_arrays(circle, square, triangle, cross))  # (4, B, H, W)
            sdf = np.take_along_axis(sdf, p["kind"][None, :, slot, None, None], axis=0)[0]  # (B, H, W)
            alpha = np.clip(0.5 - sdf, 0.0, 1.0) * p["active"][:, slot, None, None]  # 1-pixel anti-aliasing
            color = p["color"][:, slot, None, None, :].astype(np.float32)  # (B, 1, 1, 3)
            img = img + alpha[..., None] * (color - img)
        return np.rint(img * 255.0).astype(np.uint8)

    def images(self, indices: np.ndarray | list[int]) -> tuple[Tensor, Tensor]:
        """A batch: images float32 (B, 3, H, W) in [-1, 1], labels int64 (B,)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._check_indices(idx)
        p = self._params(idx)
        return _to_signed_unit(self._render(p)), torch.from_numpy(p["kind"][:, 0].copy())

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        images, labels = self.images(indices)
        return list(zip(images.unbind(0), labels.unbind(0)))

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        images, labels = self.images([i])
        return images[0], labels[0]

    def describe(self, i: int) -> dict[str, Any]:
        """Ground truth of item i (see the class docstring for the format)."""
        idx = np.array([i], dtype=np.int64)
        self._check_indices(idx)
        p = self._params(idx)
        shapes = [
            {"type": self.classes[int(p["kind"][0, s])], "label": int(p["kind"][0, s]),
             "center": (float(p["cx"][0, s]), float(p["cy"][0, s])), "radius": float(p["radius"][0, s]),
             "color": tuple(float(c) for c in p["color"][0, s])}
            for s in range(int(p["count"][0]))
        ]
        return {"label": shapes[0]["label"], "background": tuple(float(c) for c in p["bg"][0]), "shapes": shapes}


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------
class ImageFolder(Dataset):
    """PNG/JPEG images under `root`, read with Pillow and converted to RGB.

    Layout: either images directly in `root` (label 0 for all), or one subfolder per class
    (`root/<class>/**/*.png`, labels by sorted class name; `classes` lists them); not both.
    Sizes: with `resize=False` every image must be `size` x `size` (or, with size=None, all the
    same size); with `resize=True` the shorter side is resized to `size` (bicubic) and the centre
    cropped. Every file's header is read once here, so unreadable files fail at construction.
    """

    def __init__(self, root: str | os.PathLike, size: int | None = None, resize: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        if resize and size is None:
            raise ValueError("ImageFolder: resize=True needs a target size")
        self.size, self.resize = size, resize
        files = sorted(
            p for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
        )
        if not files:
            raise ValueError(f"image folder {self.root} contains no {'/'.join(IMAGE_SUFFIXES)} files")
        top = [p for p in files if p.parent == self.root]
        self.classes = sorted({p.relative_to(self.root).parts[0] for p in files if p.parent != self.root})
        if top and self.classes:
            raise ValueError(
                f"image folder {self.root} mixes images at the top level ({top[0].name}) with class "
                f"subfolders ({self.classes[0]}/); use one layout")
        class_index = {c: k for k, c in enumerate(self.classes)}
        self.files = files
        self.labels = [class_index[p.relative_to(self.root).parts[0]] if self.classes else 0 for p in files]
        self.image_size = self._check_sizes([self._header_size(p) for p in files])  # (H, W)

    @staticmethod
    def _header_size(path: Path) -> tuple[int, int]:
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.height, im.width
        except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError...
            raise ValueError(f"cannot read image file {path}: {e}") from e

    def _check_sizes(self, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        if self.resize:
            return (self.size, self.size)
        for path, hw in zip(self.files, sizes):
            want = (self.size, self.size) if self.size is not None else sizes[0]
            if hw != want:
                what = f"size {self.size}x{self.size}" if self.size is not None else f"{self.files[0]} ({want[1]}x{want[0]})"
                raise ValueError(
                    f"image {path} is {hw[1]}x{hw[0]} but {what} was expected; pass resize=True "
                    f"(DataConfig.resize) to resize and centre-crop")
        return sizes[0]

    def __len__(self) -> int:
        return len(self.files)

    def identity(self) -> dict[str, Any]:
        # the listing (relative names and byte sizes), not the absolute root: a moved folder is the same data
        listing = hashlib.sha256()
        for p in self.files:
            listing.update(f"{p.relative_to(self.root).as_posix()}\0{p.stat().st_size}\n".encode())
        return {"classes": self.classes, "size": self.size, "resize": self.resize, "listing": listing.hexdigest()}

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except Exception as e:
            raise ValueError(f"cannot read image file {path}: {e}") from e
        if self.resize:
            s = self.size
            scale = s / min(im.width, im.height)
            w, h = max(s, round(im.width * scale)), max(s, round(im.height * scale))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
        return _to_signed_unit(np.asarray(im)), torch.tensor(self.labels[i], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------
class ArrayDataset(Dataset):
    """Images from a numpy array, a .npy file (memory-mapped) or a .npz file (keys `images` and
    optionally `labels`). uint8 images are (N, H, W, 3) HWC in [0, 255]; float images are
    (N, 3, H, W) CHW already in [-1, 1] (checked). `labels` (N,) integers override the file's;
    without any, every label is 0."""

    def __init__(self, path_or_array: str | os.PathLike | np.ndarray | Tensor,
                 labels: np.ndarray | Tensor | None = None) -> None:
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
        self.source = source
        chw = self.images.dtype != np.uint8
        self.image_size = tuple(self.images.shape[2:4] if chw else self.images.shape[1:3])  # (H, W)

    @staticmethod
    def _load(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
        if not path.is_file():
            raise FileNotFoundError(f"array file {path} does not exist")
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None, path.name
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "images" not in z.files:
                    raise ValueError(f"{path}: an .npz needs an 'images' array, found keys {z.files}")
                return z["images"], (z["labels"] if "labels" in z.files else None), path.name
        raise ValueError(f"array file {path} must end in .npy or .npz")

    @staticmethod
    def _check_images(images: np.ndarray, source: str) -> np.ndarray:
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"{source}: images must be a non-empty 4-d array, got shape {images.shape}")
        if images.dtype == np.uint8:
            if images.shape[3] != 3:
                raise ValueError(f"{source}: uint8 images must be (N, H, W, 3) HWC, got shape {images.shape}")
        elif images.dtype in (np.float16, np.float32, np.float64):
            if images.shape[1] != 3:
                raise ValueError(f"{source}: float images must be (N, 3, H, W) CHW, got shape {images.shape}")
            lo, hi = float(np.min(images)), float(np.max(images))
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1 - FLOAT_RANGE_SLACK or hi > 1 + FLOAT_RANGE_SLACK:
                raise ValueError(f"{source}: float images must lie in [-1, 1], found range [{lo}, {hi}]")
        else:
            raise TypeError(f"{source}: images must be uint8 (N, H, W, 3) or float (N, 3, H, W), got dtype {images.dtype}")
        return images

    @staticmethod
    def _check_labels(labels: np.ndarray | None, n: int, source: str) -> np.ndarray:
        if labels is None:
            return np.zeros(n, dtype=np.int64)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{source}: labels must be an integer array of shape ({n},), got {labels.dtype} {labels.shape}")
        return labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def identity(self) -> dict[str, Any]:
        return {"source": self.source, "shape": list(self.images.shape), "dtype": str(self.images.dtype)}

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        image = _to_signed_unit(x) if x.dtype == np.uint8 else torch.from_numpy(np.array(x, dtype=np.float32))
        return image, torch.tensor(self.labels[i], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def build_dataset(cfg: DataConfig) -> Dataset:
    """The dataset a DataConfig names, with images of cfg.size x cfg.size."""
    if cfg.name == "shapes":
        return ProceduralShapes(cfg.num_samples, cfg.size, cfg.seed)
    if cfg.name == "folder":
        return ImageFolder(cfg.root, cfg.size, cfg.resize)
    ds = ArrayDataset(cfg.root)
    if ds.image_size != (cfg.size, cfg.size):
        raise ValueError(f"{cfg.root}: images are {ds.image_size[1]}x{ds.image_size[0]}, DataConfig.size is {cfg.size}")
    return ds


def dataset_fingerprint(ds: Dataset, num_probes: int = 8) -> str:
    """sha256 hex of a dataset's identity: class, `identity()` (if defined), length, and `num_probes`
    items spread over the index range. Probed images are hashed after rounding to 8 bits, so
    last-bit float differences between machines do not change the fingerprint."""
    n = len(ds)
    ident = getattr(ds, "identity", dict)()
    h = hashlib.sha256()
    h.update(json.dumps({"class": f"{type(ds).__module__}.{type(ds).__qualname__}", "len": n, "identity": ident},
                        sort_keys=True).encode())
    for i in sorted({int(k) for k in np.linspace(0, n - 1, num=min(num_probes, n))}):
        image, label = ds[i]
        q = torch.round((image.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
        h.update(f"{i}:{tuple(q.shape)}:{int(label)}:".encode())
        h.update(q.numpy().tobytes())
    return h.hexdigest()
