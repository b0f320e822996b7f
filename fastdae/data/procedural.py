"""The procedural datasets (no download): shapes (the default, 4 classes) and textures (5 classes),
every item a pure function of (seed, index).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fastdae.data.config import (
    _to_signed_unit,
)

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
        return list(zip(images.unbind(0), labels.unbind(0), strict=True))

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        images, labels = self.images([i])
        return images[0], labels[0]


class ProceduralShapes(ProceduralDataset):
    """size x size RGB images of 1-3 coloured shapes (circle, square, triangle, cross) on a plain
    dark background; the label is the type of the first shape, which is the largest and drawn on top.

    Item i is a pure function of (seed, i) (see ProceduralDataset); 8192 images render in about a
    second. Every shape lies inside the image; edges are anti-aliased over one pixel.

    The ground truth of item i, as drawn from `_batch_params` (tests/data/test_data.py checks the
    rendering against it):
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


class ProceduralTextures(ProceduralDataset):
    """size x size RGB images filled edge to edge by one two-colour periodic texture; the label is
    its kind: stripes, checks (a checkerboard), dots (a square lattice of discs), rings (concentric
    about a centre) or waves (stripes bent by a sine across them).

    Harder than, and unlike, the shapes: the class is a texture, not an object; every pixel is detail
    (edges every half period, 0.15-0.3 of the image), and period, orientation, phase (the pattern's
    origin) and both colours are random per item, so no colour, position or frequency gives the class
    away. Item i is a pure function of (seed, i) (see ProceduralDataset); edges are anti-aliased over
    about one pixel.

    The ground truth of item i, as drawn from `_batch_params` (checked like the shapes'):
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
