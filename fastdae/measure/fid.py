"""FID between two image sets, with local Inception weights and cached reference statistics.

    fastdae.fid("ref/VIRTUAL_imagenet256_labeled.npz", "samples.npz", inception="pt_inception-2015-12-05-6726825d.pth")
    python -m fastdae fid REAL FAKE --inception pt_inception-2015-12-05-6726825d.pth --stats-cache ~/.cache/fid

Each side is one of
  - a folder of images (bmp jpg jpeg pgm png ppm tif tiff webp, searched recursively, sorted);
  - an `.npz` with `arr_0`, uint8 (N, H, W, 3) images (the ADM layout `fastdae sample` writes),
    streamed in batches, never loaded whole;
  - an `.npz` with `mu` and `sigma` (pytorch-fid's statistics files; ADM's reference batches hold
    them too): used as they are, as pytorch-fid does.
Images are read as RGB uint8, mapped to [-1, 1] and resized to 299x299 (bilinear) by
fastdae.models.inception.FIDInceptionV3, whose weights are pytorch-fid's file
(pt_inception-2015-12-05-6726825d.pth), given as a local path: nothing is downloaded. Images of
different sizes are each resized on their own (the same function the batched resize computes).

With `stats_cache`, the statistics of an image source are stored as `<key>.npz` (mu, sigma:
pytorch-fid's layout, so the file can itself be passed as a side), keyed by a fingerprint of the
source (each file's relative path, size and mtime; no content is read), the Inception file's
sha256 and this module's preprocessing version. A changed file or other weights miss the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor

from fastdae.data.folder import read_rgb8
from fastdae.files import sha256_file
from fastdae.measure import GaussianStats, frechet_distance, gaussian_stats
from fastdae.models.inception import INPUT_SIZE, FIDInceptionV3

if TYPE_CHECKING:
    from typing_extensions import Unpack

IMAGE_EXTENSIONS = frozenset({".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"})
STATS_VERSION = 1  # part of the cache key: bump when the preprocessing changes


def _no_weights_error() -> ValueError:
    return ValueError(
        "fid: computing Inception features needs local weights: pass inception=PATH (--inception PATH) "
        "to pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or a .safetensors of it); "
        "fastdae downloads nothing"
    )


PSD_TOLERANCE = 1e-6  # eigenvalues of sigma down to -1e-6 x its largest are rounding, not a broken file


def _stats_file(path: Path) -> GaussianStats | None:
    """(mu, sigma) float64 of a pytorch-fid statistics .npz, checked (`_check_stats`); None for any other .npz."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                return None
            mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"fid: {path} is not a readable .npz ({type(e).__name__}: {e})") from None
    _check_stats(path, mu, sigma)
    return mu, sigma


def _check_stats(path: Path, mu: Tensor, sigma: Tensor) -> None:
    """A statistics file must describe a Gaussian: finite mu (D,), and sigma (D, D) symmetric positive
    semi-definite. Anything else gives an FID of 0, NaN or a negative number that reads as a result."""
    if mu.dim() != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be (D,) and sigma (D, D), got {tuple(mu.shape)} and {tuple(sigma.shape)}")
    for name, t in (("mu", mu), ("sigma", sigma)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: {name} holds {int((~torch.isfinite(t)).sum())} NaN or infinite values")
    scale = float(sigma.abs().max()) or 1.0
    if float((sigma - sigma.T).abs().max()) > PSD_TOLERANCE * scale:
        raise ValueError(f"{path}: sigma is not symmetric, so it is no covariance matrix")
    lowest = float(torch.linalg.eigvalsh(sigma).min())
    if lowest < -PSD_TOLERANCE * scale:
        raise ValueError(
            f"{path}: sigma is not positive semi-definite (smallest eigenvalue {lowest:.3g}), so it is no "
            f"covariance matrix"
        )


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"fid: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    if len(files) < 2:
        raise ValueError(f"fid: one image in {folder} ({files[0].name}); statistics need at least 2")
    return files


def fingerprint(source: str | os.PathLike) -> str:
    """sha256 of a source's identity without reading its pixels: for a folder each image's relative
    path, size and mtime; for a file its resolved path, size and mtime."""
    path = Path(source).resolve()
    files = _image_files(path) if path.is_dir() else [path]
    h = hashlib.sha256(str(path).encode())
    for f in files:
        st = f.stat()
        h.update(f"\0{f.relative_to(path) if path.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


class _FolderImages(torch.utils.data.Dataset):
    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        return read_rgb8(self.files[i])  # (H, W, 3) uint8; a ValueError naming an unreadable file


def _folder_batches(folder: Path, batch_size: int, num_workers: int | None) -> Iterator[list[np.ndarray]]:
    """Decoded images in batches; num_workers None: one decoding process per CPU core, at most 8."""
    if num_workers is None:
        num_workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        _FolderImages(_image_files(folder)), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    yield from loader


def npz_image_batches(path: Path, batch_size: int, min_images: int = 0) -> Iterator[np.ndarray]:
    """(b, H, W, 3) uint8 batches of the `arr_0` member, read from the zip stream (as ADM's evaluator
    does): an ADM .npz of any size in O(batch) memory. Fewer than `min_images` images: ValueError."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from None
    with zf:
        if "arr_0.npy" not in zf.namelist():
            raise ValueError(f"{path}: neither statistics (mu, sigma) nor images (arr_0) in this .npz")
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"{path}: arr_0.npy has .npy format version {version}; 1.0 or 2.0 expected")
            shape, fortran, dtype = read_header[version](f)
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
                raise ValueError(
                    f"{path}: arr_0 must be uint8 (N, H, W, 3) in C order (the ADM layout), got "
                    f"{dtype} {shape}{' Fortran order' if fortran else ''}"
                )
            if shape[0] < min_images or shape[1] < 1 or shape[2] < 1:
                raise ValueError(
                    f"{path}: arr_0 holds {shape[0]} images of {shape[1]}x{shape[2]}; at least {min_images} "
                    f"non-empty images are needed"
                )
            per_image = shape[1] * shape[2] * 3
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = f.read(n * per_image)
                if len(data) != n * per_image:
                    raise ValueError(f"{path}: arr_0 ends after {start} of {shape[0]} images")
                yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(n, *shape[1:])  # writable


def _net_input(images: list[np.ndarray] | np.ndarray) -> Tensor:
    """uint8 (H, W, 3) images -> (B, 3, h, w) float in [-1, 1]; same-sized images are stacked as they
    are (the network resizes them), others each resized to 299x299 here first."""
    x = [torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images]
    if len({t.shape for t in x}) > 1:
        x = [F.interpolate(t[None], size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)[0] for t in x]
    return torch.stack(x)


class _Inception:
    """The FID network, built on first use (a side given as statistics needs none)."""

    def __init__(self, path: str | os.PathLike | None, device: torch.device) -> None:
        self.path, self.device, self._net = path, device, None
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self.path is None:
            raise _no_weights_error()
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    @torch.no_grad()
    def features(self, batch: Tensor) -> Tensor:
        if self._net is None:
            if self.path is None:
                raise _no_weights_error()
            try:
                self._net = FIDInceptionV3.from_file(self.path).to(self.device)
            except (RuntimeError, EOFError, KeyError, AttributeError, pickle.UnpicklingError, SafetensorError) as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise ValueError(
                    f"fid: {self.path} is not a readable Inception weights file ({type(e).__name__}: {first})"
                ) from None
        return self._net(batch.to(self.device)).float().cpu()  # (B, 2048)


def _image_stats(
    path: Path, net: _Inception, batch_size: int, num_workers: int | None, progress: bool
) -> GaussianStats:
    from tqdm import tqdm

    batches = (
        _folder_batches(path, batch_size, num_workers)
        if path.is_dir()
        else npz_image_batches(path, batch_size, min_images=2)
    )
    # the source's header, its first image and the network are refused before the progress bar draws;
    # leave=False: the bar clears its line when closed, so an error later is the one line printed
    feats = [net.features(_net_input(next(batches)))]
    bar = tqdm(batches, desc=f"fid {path.name}", unit="batch", initial=1, disable=not progress, leave=False)
    try:
        feats += [net.features(_net_input(b)) for b in bar]
    finally:
        bar.close()
    return gaussian_stats(torch.cat(feats))  # (N, 2048) -> mu (2048,), sigma (2048, 2048)


def _save_stats(path: Path, stats: GaussianStats) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, mu=stats[0].numpy(), sigma=stats[1].numpy())
    os.replace(tmp, path)


class FIDOptions(TypedDict, total=False):
    """The keyword options of `fid` and `statistics`; their defaults are _Reader's."""

    batch_size: int  # images per Inception batch (50)
    stats_cache: str | os.PathLike | None  # folder caching each image source's statistics (None: no cache)
    device: str  # "auto" (CUDA when available), "cpu", "cuda:1", ...
    num_workers: int | None  # image-decoding workers for folders (None: the CPU cores, at most 8)
    progress: bool  # a progress bar per image source (False)


@dataclass(frozen=True)
class _Reader:
    """Image sources -> Inception statistics, with one network for every source it reads."""

    net: _Inception
    batch_size: int = 50
    stats_cache: str | os.PathLike | None = None
    num_workers: int | None = None
    progress: bool = False

    @classmethod
    def open(cls, inception: str | os.PathLike | None, device: str = "auto", **options: Any) -> _Reader:
        return cls(_Inception(inception, _device(device)), **options)

    def statistics(self, path: Path) -> GaussianStats:
        if not path.exists():
            raise FileNotFoundError(f"fid: {path} does not exist")
        if self.batch_size < 1 or (self.num_workers is not None and self.num_workers < 0):
            raise ValueError(
                f"fid: batch_size must be >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}"
            )
        if path.is_file():
            if path.suffix != ".npz":
                raise ValueError(f"fid: {path} must be a folder of images or an .npz (arr_0 images, or mu and sigma)")
            stats = _stats_file(path)
            if stats is not None:
                return stats
        cached = None
        if self.stats_cache is not None:
            source = {"version": STATS_VERSION, "inception": self.net.sha256, "source": fingerprint(path)}
            cached = Path(self.stats_cache) / f"{hashlib.sha256(json.dumps(source).encode()).hexdigest()}.npz"
            if cached.is_file():
                return _stats_file(cached)
        stats = _image_stats(path, self.net, self.batch_size, self.num_workers, self.progress)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            _save_stats(cached, stats)
        return stats


def statistics(
    source: str | os.PathLike, inception: str | os.PathLike | None = None, **options: Unpack[FIDOptions]
) -> GaussianStats:
    """(mu (2048,), sigma (2048, 2048)) float64 Inception statistics of one source (see the module
    docstring); with stats_cache, read from / written to the cache. Options: FIDOptions."""
    return _Reader.open(inception, **options).statistics(Path(source))


def _device(device: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def fid(
    real: str | os.PathLike,
    fake: str | os.PathLike,
    inception: str | os.PathLike | None = None,
    **options: Unpack[FIDOptions],
) -> float:
    """Fréchet Inception distance between `real` and `fake` (folders, image .npz or statistics .npz):
    fastdae.measure.frechet_distance of their Inception statistics. Symmetric in its two sides.
    Options: FIDOptions."""
    reader = _Reader.open(inception, **options)  # one network for both sides
    a, b = reader.statistics(Path(real)), reader.statistics(Path(fake))
    value = frechet_distance(a, b)
    if not math.isfinite(value):  # checked inputs make this unreachable; a NaN must never print as a score
        raise ValueError(f"fid: the Fréchet distance of {real} and {fake} is {value}, not a number")
    return value
