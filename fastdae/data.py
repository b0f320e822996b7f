"""Datasets: two procedural ones (no download; shapes is the default), image folders, numpy arrays.

Every dataset returns `(image, label)` with image float32 (3, H, W) in [-1, 1] and label an int64
scalar tensor, and defines `identity() -> dict` (what configures it and what it holds: a content
hash or per-file stats), which `dataset_fingerprint` hashes together with a few sampled items; the
latent cache stores that fingerprint in its manifest. Every dataset has `num_classes` (shapes: 4;
textures: 5; a folder: its class subfolders, 1 without; an array: 1 + its largest label, over all labels).

`split_dataset` cuts a dataset into the part training sees and the part only evaluation sees
(DataConfig.holdout, seeded by DataConfig.seed, stratified by class); training uses the first:

    ds = build_dataset(DataConfig())            # 8192 procedural 32x32 shape images
    ds = build_dataset(DataConfig(name="textures"))  # 8192 procedural 32x32 texture images
    ds = build_dataset(DataConfig(name="folder", root="imgs/", size=64, crop="random", flip=True))
    ds = build_dataset(DataConfig(name="array", root="faces.npz", size=64))
    train, heldout = split_dataset(ds, cfg)     # disjoint; together every item (procedural: see split_dataset)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

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
        if self.name not in PROCEDURAL and not self.root:
            raise ValueError(f"DataConfig.root is required for name={self.name!r} (a folder or .npy/.npz file)")
        if self.size < 1 or self.num_samples < 1:
            raise ValueError(f"DataConfig.size and num_samples must be >= 1, got {self.size}, {self.num_samples}")
        if self.crop not in CROPS:
            raise ValueError(f"DataConfig.crop must be one of {CROPS}, got {self.crop!r}")
        if self.name != "folder" and (self.crop != "center" or self.flip):
            raise ValueError(f"DataConfig.crop and flip apply to name='folder' only, got name={self.name!r}")
        h = self.holdout
        if h is not None and not (0 < h < 1 or (h >= 1 and float(h).is_integer())):
            raise ValueError(f"DataConfig.holdout must be a fraction in (0, 1) or a whole count >= 1, got {h!r}")

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


def _to_signed_unit(rgb_uint8: np.ndarray) -> Tensor:
    """(..., H, W, 3) uint8 -> float32 (..., 3, H, W) in [-1, 1]."""
    x = np.ascontiguousarray(np.moveaxis(rgb_uint8, -1, -3), dtype=np.float32)  # a writable copy
    return torch.from_numpy(x).div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# Procedural datasets: shapes, textures
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


class ProceduralDataset(Dataset):
    """A dataset generated from (seed, index): the base of ProceduralShapes and ProceduralTextures.

    Item i is generator index offset + i, a pure function of (seed, offset + i) (counter-based hashing,
    see `_uniforms`): distinct indices of one seed give distinct item keys (each step of the key hash
    is a bijection of uint64), so index ranges never share an item, which is what `split_dataset`'s
    held-out part (the indices after the training range) relies on. Batches are rendered with
    vectorised numpy (`__getitems__`, used by torch's DataLoader). A subclass sets `classes`,
    `num_classes`, `_DRAWS` (uniforms per item) and `_VERSION`, and defines `_params` (uniforms
    (B, _DRAWS) -> parameters, with "label" (B,)) and `_render` (parameters -> uint8 (B, H, W, 3))."""

    classes: tuple[str, ...]
    num_classes: int
    _DRAWS: int
    _VERSION: int
    MIN_SIZE = 8  # pixels: below it neither shapes nor textures are recognisable

    def __init__(self, num_samples: int, size: int = 32, seed: int = 0, offset: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if size < self.MIN_SIZE:
            raise ValueError(
                f"size must be >= {self.MIN_SIZE} pixels for {type(self).__name__} to be recognisable, got {size}"
            )
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self.num_samples, self.size, self.seed, self.offset = int(num_samples), int(size), int(seed), int(offset)
        self.image_size = (self.size, self.size)  # (H, W)

    def __len__(self) -> int:
        return self.num_samples

    def identity(self) -> dict[str, Any]:
        ident = {"num_samples": self.num_samples, "size": self.size, "seed": self.seed, "version": self._VERSION}
        return {**ident, "offset": self.offset} if self.offset else ident  # offset 0: the fingerprint of before

    def part(self, start: int, stop: int) -> ProceduralDataset:
        """Items [start, stop) of this dataset as a dataset of the same kind (generator indices
        offset + start ...): a split's or the judge's part without materialising an index list."""
        if not 0 <= start < stop:
            raise ValueError(f"part needs 0 <= start < stop, got [{start}, {stop})")
        return type(self)(stop - start, self.size, self.seed, offset=self.offset + start)

    def _check_indices(self, indices: np.ndarray) -> None:
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"index out of range for {type(self).__name__} of length {self.num_samples}")

    def _params(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _render(self, p: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _batch_params(self, indices: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._check_indices(idx)
        return self._params(idx)

    def images(self, indices: np.ndarray | list[int]) -> tuple[Tensor, Tensor]:
        """A batch: images float32 (B, 3, H, W) in [-1, 1], labels int64 (B,)."""
        p = self._batch_params(indices)
        return _to_signed_unit(self._render(p)), torch.from_numpy(p["label"].copy())

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        images, labels = self.images(indices)
        return list(zip(images.unbind(0), labels.unbind(0)))

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        images, labels = self.images([i])
        return images[0], labels[0]


class ProceduralShapes(ProceduralDataset):
    """size x size RGB images of 1-3 coloured shapes (circle, square, triangle, cross) on a plain
    dark background; the label is the type of the first shape, which is the largest and drawn on top.

    Item i is a pure function of (seed, i) (see ProceduralDataset); 8192 images render in about a
    second. Every shape lies inside the image; edges are anti-aliased over one pixel.

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
    _VERSION = 1

    def _params(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Shape parameters of a batch: label (B,), background (B, 3), count (B,), and per slot (B, S)
        type, cx, cy, radius, (B, S, 3) color, (B, S) active."""
        u = _uniforms(self.seed, indices + self.offset, self._DRAWS)  # (B, D)
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
        return {
            "label": kind[:, 0],
            "bg": bg,
            "count": count,
            "kind": kind,
            "cx": cx,
            "cy": cy,
            "radius": radius,
            "color": color,
            "active": active,
        }

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

    def describe(self, i: int) -> dict[str, Any]:
        """Ground truth of item i (see the class docstring for the format)."""
        p = self._batch_params([i])
        shapes = [
            {
                "type": self.classes[int(p["kind"][0, s])],
                "label": int(p["kind"][0, s]),
                "center": (float(p["cx"][0, s]), float(p["cy"][0, s])),
                "radius": float(p["radius"][0, s]),
                "color": tuple(float(c) for c in p["color"][0, s]),
            }
            for s in range(int(p["count"][0]))
        ]
        return {"label": shapes[0]["label"], "background": tuple(float(c) for c in p["bg"][0]), "shapes": shapes}


class ProceduralTextures(ProceduralDataset):
    """size x size RGB images filled edge to edge by one two-colour periodic texture; the label is
    its kind: stripes, checks (a checkerboard), dots (a square lattice of discs), rings (concentric
    about a centre) or waves (stripes bent by a sine across them).

    Harder than, and unlike, the shapes: the class is a texture, not an object; every pixel is detail
    (edges every half period, 0.15-0.3 of the image), and period, orientation, phase (the pattern's
    origin) and both colours are random per item, so no colour, position or frequency gives the class
    away. Item i is a pure function of (seed, i) (see ProceduralDataset); edges are anti-aliased over
    about one pixel.

    `describe(i)` gives the ground truth of item i:
        {"label": int, "type": "rings", "period": px, "angle": radians, "center": (x, y),
         "colors": ((r, g, b), (r, g, b))}
    The texture is a function g of the coordinates (u, v), in pixels, of a pixel centre in the frame
    rotated by `angle` about `center` (x right, y down, pixel centres at +0.5); with k = 2 pi / period:
    stripes sin(k u); checks sign(sin(k u) sin(k v)) min(|sin(k u)|, |sin(k v)|) (the sign of the
    product, with a slope of k at every edge); dots cos(k u) + cos(k v) - 0.5; rings sin(k |(u, v)|);
    waves sin(k u + 1.5 sin(k v / 2)). Pixels with g > 0 take colors[0], g < 0 colors[1]. One colour
    is in [0.45, 1], the other in [0, 0.3], per channel, and which is which is random.
    """

    classes = ("stripes", "checks", "dots", "rings", "waves")
    num_classes = len(classes)
    # per item: kind, period, angle, centre x, y, which colour is light, 3 light + 3 dark channels
    _DRAWS = 12
    _VERSION = 1
    PERIOD = (0.15, 0.3)  # of the image side
    WAVE_BEND = 1.5  # radians of phase: the waves' stripes move sideways by 1.5 / k, about a quarter period

    def _params(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Texture parameters of a batch: label (B,), period, angle, cx, cy (B,), colors (B, 2, 3)."""
        u = _uniforms(self.seed, indices + self.offset, self._DRAWS)  # (B, D)
        kind = np.minimum((u[:, 0] * self.num_classes).astype(np.int64), self.num_classes - 1)
        lo, hi = self.PERIOD
        period = self.size * (lo + (hi - lo) * u[:, 1])
        light, dark = 0.45 + 0.55 * u[:, 6:9], 0.3 * u[:, 9:12]  # (B, 3) each
        swap = (u[:, 5] < 0.5)[:, None, None]
        colors = np.where(swap, np.stack([dark, light], 1), np.stack([light, dark], 1))  # (B, 2, 3)
        return {
            "label": kind,
            "period": period,
            "angle": np.pi * u[:, 2],
            "cx": self.size * u[:, 3],
            "cy": self.size * u[:, 4],
            "colors": colors,
        }

    def _render(self, p: dict[str, np.ndarray]) -> np.ndarray:
        """Parameters of B items -> uint8 (B, H, W, 3)."""
        f32 = np.float32
        grid = np.arange(self.size, dtype=f32) + 0.5  # pixel centres
        dx = grid[None, None, :] - p["cx"][:, None, None].astype(f32)  # (B, 1, W)
        dy = grid[None, :, None] - p["cy"][:, None, None].astype(f32)  # (B, H, 1)
        cos, sin = (np.cos(p["angle"])[:, None, None].astype(f32), np.sin(p["angle"])[:, None, None].astype(f32))
        u, v = dx * cos + dy * sin, dy * cos - dx * sin  # (B, H, W) each
        k = (2 * np.pi / p["period"])[:, None, None].astype(f32)  # (B, 1, 1) rad / px
        ku, kv = k * u, k * v
        su, sv = np.sin(ku), np.sin(kv)
        checks = np.sign(su * sv) * np.minimum(np.abs(su), np.abs(sv))
        g = np.stack(
            [
                su,
                checks,
                np.cos(ku) + np.cos(kv) - 0.5,
                np.sin(k * np.sqrt(u * u + v * v)),
                np.sin(ku + self.WAVE_BEND * np.sin(0.5 * kv)),
            ]
        )  # (5, B, H, W)
        g = np.take_along_axis(g, p["label"][None, :, None, None], axis=0)[0]  # (B, H, W)
        # near an edge g ~ k * (distance in px) (its slope is about k for every kind), so g / k is
        # a signed distance there: one pixel of anti-aliasing, as the shapes have
        alpha = np.clip(0.5 + g / k, 0.0, 1.0)[..., None]  # (B, H, W, 1)
        c0, c1 = (p["colors"][:, j, None, None, :].astype(f32) for j in (0, 1))  # (B, 1, 1, 3)
        return np.rint((c1 + alpha * (c0 - c1)) * 255.0).astype(np.uint8)

    def describe(self, i: int) -> dict[str, Any]:
        """Ground truth of item i (see the class docstring for the format)."""
        p = self._batch_params([i])
        label = int(p["label"][0])
        return {
            "label": label,
            "type": self.classes[label],
            "period": float(p["period"][0]),
            "angle": float(p["angle"][0]),
            "center": (float(p["cx"][0]), float(p["cy"][0])),
            "colors": tuple(tuple(float(c) for c in p["colors"][0, j]) for j in (0, 1)),
        }


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------
INDEX_VERSION = 1  # bump when the index file's layout changes
STAT_CHUNK = 1 << 16  # files stat'ed per chunk of offsets when fingerprinting a folder
RACY_SECONDS = 2.0  # a directory changed this recently may change again within its mtime's tick


def index_dir() -> Path:
    """Where folder indexes are cached: $FASTDAE_INDEX_DIR, else ~/.cache/fastdae/index (never the data folder)."""
    return Path(os.environ.get("FASTDAE_INDEX_DIR", Path.home() / ".cache" / "fastdae" / "index"))


@dataclass
class FolderIndex:
    """The images under a root, in compact arrays (no Python object per image):
    names: utf-8 relative paths concatenated, uint8 (total bytes,); offsets: int64 (N + 1,), name i
    is names[offsets[i]:offsets[i + 1]]; labels: int32 (N,); classes: the class folder names;
    dirs / dir_mtimes: every directory walked (relative, "" is the root) and its st_mtime_ns, which
    is what decides whether a cached index still describes the tree."""

    names: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    classes: list[str]
    dirs: list[str]
    dir_mtimes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return self.names[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()

    @classmethod
    def scan(cls, root: Path) -> FolderIndex:
        """Walks root with os.scandir (no stat per file, no image opened): a directory's images in sorted
        name order, then its subdirectories in sorted order, depth first; names starting with "." are
        skipped and symlinked directories are not followed."""
        names, offsets, labels = bytearray(), array("q", [0]), array("i")  # compact while building too
        classes: list[str] = []
        top_file = None  # the first image directly in root, if any
        dirs, mtimes = [], []
        stack = [""]
        while stack:
            rel = stack.pop()
            dirs.append(rel)
            mtimes.append(os.stat(root / rel).st_mtime_ns)
            with os.scandir(root / rel) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it if not e.name.startswith("."))
            subdirs = []
            for name, is_dir in entries:
                path = f"{rel}/{name}" if rel else name
                if is_dir:
                    subdirs.append(path)
                    continue
                if not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if not rel:
                    top_file = top_file or name
                else:  # a class folder's subtree is walked in one piece, so its files are contiguous
                    top = rel.split("/", 1)[0]
                    if top_file is not None:
                        raise ValueError(
                            f"image folder {root} mixes images at the top level ({top_file}) with "
                            f"class subfolders ({top}/); use one layout"
                        )
                    if not classes or classes[-1] != top:
                        classes.append(top)
                names += path.encode()
                offsets.append(len(names))
                labels.append(len(classes) - 1 if rel else 0)
            stack.extend(reversed(subdirs))
        if not labels:
            raise ValueError(f"image folder {root} contains no {'/'.join(IMAGE_SUFFIXES)} files")
        return cls(
            np.frombuffer(bytes(names), dtype=np.uint8),
            np.frombuffer(offsets, dtype=np.int64),
            np.frombuffer(labels, dtype=np.int32),
            classes,
            dirs,
            np.asarray(mtimes, dtype=np.int64),
        )

    def is_current(self, root: Path) -> bool:
        """True while every walked directory keeps its mtime: adding, removing or renaming an entry
        changes its directory's mtime (POSIX), so the names and labels here are still the tree's."""
        try:
            return all(os.stat(root / d).st_mtime_ns == m for d, m in zip(self.dirs, self.dir_mtimes.tolist()))
        except OSError:
            return False

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:  # np.savez would add .npz to a name without it
                np.savez(
                    f,
                    names=self.names,
                    offsets=self.offsets,
                    labels=self.labels,
                    dir_mtimes=self.dir_mtimes,
                    meta=np.frombuffer(
                        json.dumps({"version": INDEX_VERSION, "classes": self.classes, "dirs": self.dirs}).encode(),
                        dtype=np.uint8,
                    ),
                )
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old index or the new one
        finally:
            tmp.unlink(missing_ok=True)  # after a failed write (e.g. a full disk); gone after os.replace

    @classmethod
    def load(cls, path: Path) -> FolderIndex | None:
        """The index saved at path, or None when it is absent, unreadable or of another version."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                if meta.get("version") != INDEX_VERSION:
                    return None
                return cls(z["names"], z["offsets"], z["labels"], meta["classes"], meta["dirs"], z["dir_mtimes"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # JSONDecodeError is a ValueError
            return None

    @classmethod
    def cached(cls, root: Path, cache_dir: Path | None = None) -> FolderIndex:
        """The index of root: from the cache when every directory is unchanged, else scanned and saved.
        The cache file is named by the root's absolute path; a scan whose directories changed within
        RACY_SECONDS is not saved, since a later change in the same mtime tick would go unseen."""
        root = root.resolve()
        path = (cache_dir or index_dir()) / f"{hashlib.sha256(str(root).encode()).hexdigest()[:32]}.npz"
        index = cls.load(path)
        if index is not None and index.is_current(root):
            return index
        started = time.time_ns()
        index = cls.scan(root)
        if int(index.dir_mtimes.max()) < started - int(RACY_SECONDS * 1e9):
            try:
                index.save(path)
            except OSError:  # a read-only home: the index still works, it is just not cached
                pass
        return index


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
    Unreadable or too small files raise a ValueError naming the file when they are loaded.
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
            for a, b in zip(offsets[:-1], offsets[1:]):
                name = blob[a:b]
                st = os.stat(root + b"/" + name)
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
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError...
            raise ValueError(f"cannot read image file {path}: {e}") from e
        if self.resize and min(im.width, im.height) != s:
            scale = s / min(im.width, im.height)
            im = im.resize((max(s, round(im.width * scale)), max(s, round(im.height * scale))), Image.BICUBIC)
        if min(im.width, im.height) < s:
            raise ValueError(
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
            raise TypeError(
                f"{source}: images must be uint8 (N, H, W, 3) or float (N, 3, H, W), got dtype {images.dtype}"
            )
        return images

    @staticmethod
    def _check_labels(labels: np.ndarray | None, n: int, source: str) -> np.ndarray:
        if labels is None:
            return np.zeros(n, dtype=np.int64)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{source}: labels must be an integer array of shape ({n},), got {labels.dtype} {labels.shape}"
            )
        if labels.min() < 0:
            raise ValueError(f"{source}: labels must be >= 0 (class indices), found {labels.min()}")
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


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def build_dataset(cfg: DataConfig) -> Dataset:
    """The dataset a DataConfig names, with images of cfg.size x cfg.size."""
    if cfg.name in PROCEDURAL:
        return (ProceduralShapes if cfg.name == "shapes" else ProceduralTextures)(cfg.num_samples, cfg.size, cfg.seed)
    if cfg.name == "folder":
        return ImageFolder(cfg.root, cfg.size, cfg.resize, cfg.crop, cfg.flip)
    ds = ArrayDataset(cfg.root)
    if ds.image_size != (cfg.size, cfg.size):
        raise ValueError(f"{cfg.root}: images are {ds.image_size[1]}x{ds.image_size[0]}, DataConfig.size is {cfg.size}")
    return ds


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of the N items (int64 (N,)) in which every prefix, and every run of
    consecutive items, holds each class in about its share: a class's n items, shuffled, get the keys
    (k + u_k) / n (k = 0..n-1, u_k ~ U[0, 1)), i.e. evenly spread quantiles, and items go in key
    order. A prefix of h items then holds round(h n / N) of the class, give or take one."""
    rng = np.random.default_rng([seed, 0x5EED])  # its own stream: the split never moves with other draws
    labels = np.asarray(labels, dtype=np.int64)
    keys = np.empty(len(labels))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = len(members)
        keys[rng.permutation(members)] = (np.arange(n) + rng.random(n)) / n
    return np.argsort(keys, kind="stable")


class DatasetSplit(Dataset):
    """The items `indices` (int64 (n,), into `base`) of a dataset, in that order: one part of
    `split_dataset`. Labels, classes and `num_classes` are the base dataset's (a part may lack a
    class); its identity is the base's plus the part's name and indices, so a fingerprint of a part
    covers the split."""

    def __init__(self, base: Dataset, indices: np.ndarray, part: str) -> None:
        self.base, self.indices, self.part = base, np.asarray(indices, dtype=np.int64), part
        self.labels = np.asarray(base.labels)[self.indices]
        self.num_classes = base.num_classes
        self.classes = getattr(base, "classes", None)
        self.image_size = base.image_size

    def __len__(self) -> int:
        return len(self.indices)

    def identity(self) -> dict[str, Any]:
        return {
            "base": getattr(self.base, "identity", dict)(),
            "part": self.part,
            "version": 1,
            "indices_sha256": hashlib.sha256(self.indices.tobytes()).hexdigest(),
        }

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.base[int(self.indices[i])]


def split_dataset(ds: Dataset, cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(train, heldout): training (stage 1, the cache, stage 2, the prior) sees only `train`, the
    evaluation judge only `heldout`; deterministic for a config (seeded by cfg.seed).

    A ProceduralDataset (shapes, textures): train is `ds` itself (its num_samples items, generator
    indices [offset, offset + num_samples)); heldout is cfg.holdout_count(num_samples) items generated
    from the next indices of the same seed, which never repeat a training item (see ProceduralDataset).
    Any other dataset (it needs `labels` and `num_classes`): heldout is the first
    cfg.holdout_count(N) items of `stratified_order` (each class held out in its share, give or take
    one; kept in that order, so any run of it is stratified too) and train is the rest in index order;
    together they are every item once. A holdout that leaves no training item is an error."""
    if isinstance(ds, ProceduralDataset):
        h = max(1, cfg.holdout_count(len(ds)))  # a dataset has >= 1 item
        return ds, ds.part(len(ds), len(ds) + h)
    n, h = len(ds), cfg.holdout_count(len(ds))
    if h >= n:
        raise ValueError(
            f"DataConfig.holdout={cfg.holdout!r} holds out {h} of the dataset's {n} items and leaves "
            f"none to train on; lower it"
        )
    order = stratified_order(ds.labels, cfg.seed)
    return DatasetSplit(ds, np.sort(order[h:]), "train"), DatasetSplit(ds, order[:h], "heldout")


def dataset_fingerprint(ds: Dataset, num_probes: int = 8) -> str:
    """sha256 hex of a dataset's identity: class, `identity()` (if defined), length, and `num_probes`
    items spread over the index range. fastdae's identities cover every image: an array's content
    hash, a folder's per-file stat (see ImageFolder.identity), a procedural one's generator settings; the
    probes guard other datasets. Probes are drawn under a fixed torch seed (random crops and flips
    repeat) and hashed after rounding to 8 bits, so last-bit float differences between machines
    do not change the fingerprint."""
    n = len(ds)
    ident = getattr(ds, "identity", dict)()
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"class": f"{type(ds).__module__}.{type(ds).__qualname__}", "len": n, "identity": ident}, sort_keys=True
        ).encode()
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i in sorted({int(k) for k in np.linspace(0, n - 1, num=min(num_probes, n))}):
            image, label = ds[i]
            q = torch.round((image.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
            h.update(f"{i}:{tuple(q.shape)}:{int(label)}:".encode())
            h.update(q.numpy().tobytes())
    return h.hexdigest()
