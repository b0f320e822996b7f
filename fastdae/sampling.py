"""Sampling at scale: N DiT samples of a finished run, decoded, as an ADM-evaluator `.npz`.

    fastdae.sample("runs/x", num_samples=50_000, out="samples.npz", png_dir="samples/")
    python -m fastdae sample --run runs/x --num-samples 50000 --out samples.npz      # or under torchrun

The output holds `arr_0`, uint8 (N, H, W, 3) images, and `arr_1`, int64 (N,) class labels for a
class-conditional DiT: the layout guided-diffusion's sampler writes and its evaluator
(evaluations/evaluator.py) reads (it opens `arr_0.npy` by name and streams it).

Reproducible and resumable. Sample i's noise comes from its own generator, seeded from (seed, i);
its label is the i-th of a label list fixed by (seed, N). So a sample does not depend on which
batch or rank draws it, and a rerun after an interruption continues where it stopped: finished
index ranges are shards in `<out>.parts/` (each written to a temp name and renamed), and only
the gaps are generated. With the same batch size the result is bitwise that of a run that never
stopped; another batch size changes only float rounding inside the batched matmuls. Under torchrun
each rank takes every world_size-th batch and writes its own shards; rank 0 merges them into `out`
(streamed shard by shard, memory O(shard)), writes `<out>.json` (settings and throughput) and
removes the shards.

One process at a time writes an `out`: it holds an flock on `.<out name>.lock` next to it (released
by the OS if the process dies); a second `sample` on the same `out` is refused with one line and
touches nothing. Arguments are checked before anything is written: a guidance scale must be finite,
the seed fit 64 bits, and the output (with its shards while they are merged) fit the free disk space.
`png_dir` given for an `out` that is already complete writes the PNGs from it.

The run folder is read through fastdae.training's Run (its layout and identity checks: a run whose
prior or final decoder is missing or stale is refused) and decoded with the trainer's own Sampler,
the one the samples stage draws its grid with.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastdae import files
from fastdae.measure.fid import npz_image_batches
from fastdae.sampler import Sampler
from fastdae.training.distributed import Dist
from fastdae.training.identity import differences
from fastdae.training.run import Run
from fastdae.training.samples import SETTINGS_SINCE, build_sampler

__all__ = ["Sampler", "load_sampler", "open_run", "sample", "sample_generator", "sample_labels"]

LABEL_MODES = ("balanced", "random")
PARTS_SUFFIX = ".parts"
SETTINGS_FILE = "settings.json"
SHARD_FILE = re.compile(r"(\d{8})-(\d{8})\.npz")
SEED_LIMIT = 2**63  # SeedSequence takes any non-negative int; torch generators 64 bits


def _check_arguments(num_samples: int, batch_size: int, seed: int, cfg_scale: float | None, steps: int | None) -> None:
    """What sample's arguments must be, checked before the run is opened or anything written."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"sample: num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"sample: seed must be in [0, 2**63), got {seed}")
    if cfg_scale is not None and not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"sample: cfg_scale must be a finite number >= 0, got {cfg_scale}")
    if steps is not None and steps < 1:
        raise ValueError(f"sample: steps must be >= 1, got {steps}")


def _check_device(device: str) -> None:
    """A CUDA device this machine has (the run's config checks the name's form)."""
    if not device.startswith("cuda"):
        return
    index = device.partition(":")[2]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (index and not index.isdigit()) or int(index or 0) >= count:
        raise ValueError(f"sample: device={device!r} but torch sees {count} CUDA device(s); use 'auto' or 'cpu'")


def _existing_folder(path: Path) -> Path:
    """path, or its nearest ancestor that exists (where the files will go, for disk_usage)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_disk(out: Path, num_samples: int, image_size: int) -> None:
    """Refuse an `out` that cannot fit: its uint8 images and int64 labels, twice while the shards
    are merged into it (a count like 10**12 died in the allocator before)."""
    need = 2 * num_samples * (image_size * image_size * 3 + 8)
    free = shutil.disk_usage(_existing_folder(out.parent)).free
    if need > free:
        raise ValueError(
            f"sample: {num_samples} samples of {image_size}x{image_size} need about {need / 1e9:.3g} GB for {out} "
            f"and its shards while they are merged, and {out.parent} has {free / 1e9:.3g} GB free; "
            f"lower --num-samples or pick another --out"
        )


@contextlib.contextmanager
def exclusive(out: Path, d: Dist | None = None) -> Iterator[None]:
    """Hold `.<out name>.lock` next to out (fastdae.files.exclusive_lock): a second writer of the same
    out is refused with FileExistsError instead of racing for its shards. Under torchrun (d) rank 0
    takes the lock and every rank learns whether it got it, so a refused run stops on every rank
    (none waits at a barrier for a rank that has left)."""
    d = d or Dist()

    def busy(pid: str) -> str:
        holder = f" (pid {pid})" if pid else ""
        return (
            f"sample: another fastdae sample{holder} is writing {out}; wait for it (run again then and the "
            f"finished samples are found) or pick another --out"
        )

    with contextlib.ExitStack() as held:
        refused = None
        if d.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                held.enter_context(files.exclusive_lock(out.with_name(f".{out.name}.lock"), busy))
            except FileExistsError as e:
                refused = str(e)
        refused = d.from_main(refused)
        if refused is not None:
            raise FileExistsError(refused)
        yield


def open_run(run_dir: str | os.PathLike, device: str = "auto") -> Run:
    """The finished run in `run_dir`, refused (RunError, naming what changed) unless its final decoder
    (stage 2's; stage 1's in mode "joint") and its prior finished and still match what they were
    built from: the encoder file, the dataset and the config keys they depend on."""
    r = Run.open(run_dir, device)
    for stage in (r.final_decoder_stage, "prior"):
        r.require_current(stage)
    return r


def load_sampler(
    run_dir: str | os.PathLike,
    device: torch.device | str = "auto",
    steps: int | None = None,
    sampler: str | None = None,
    cfg_scale: float | None = None,
) -> Sampler:
    """The Sampler of the finished run in `run_dir` (open_run's checks; fastdae.training.samples.build_sampler):
    what the trainer's samples stage decodes with. steps, sampler, cfg_scale default to the run's prior config."""
    _check_arguments(1, 1, 0, cfg_scale, steps)
    _check_device(str(device))
    return build_sampler(open_run(run_dir, str(device)), steps, sampler, cfg_scale)


# ---------------------------------------------------------------------------------------------
# Labels, seeds, work split
# ---------------------------------------------------------------------------------------------
def sample_labels(num_samples: int, num_classes: int, mode: str, seed: int) -> Tensor | None:
    """(N,) int64 labels: "balanced" cycles 0..K-1 (N / K of each class when K divides N), "random"
    draws them uniformly from a generator seeded with `seed`. None for an unconditional DiT."""
    if mode not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {mode!r}")
    if num_classes == 0:
        return None
    if mode == "balanced":
        return torch.arange(num_samples) % num_classes
    return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


def sample_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """Sample `index`'s own generator: seeded by SeedSequence((seed, index)), so streams of nearby
    indices or seeds are unrelated."""
    state = np.random.SeedSequence((seed, index)).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def _shard_name(start: int, stop: int) -> str:
    return f"{start:08d}-{stop:08d}.npz"


def _done_ranges(parts: Path) -> list[tuple[int, int]]:
    """[start, stop) index ranges of the complete shards in `parts`, sorted."""
    found = (SHARD_FILE.fullmatch(path.name) for path in parts.iterdir())
    return sorted((int(m.group(1)), int(m.group(2))) for m in found if m is not None)


def _todo_chunks(num_samples: int, done: list[tuple[int, int]], batch_size: int) -> list[tuple[int, int]]:
    """The gaps between done ranges in [0, N), cut into [start, stop) chunks of at most batch_size."""
    chunks, cursor = [], 0
    for start, stop in [*done, (num_samples, num_samples)]:
        for a in range(cursor, start, batch_size):
            chunks.append((a, min(a + batch_size, start)))
        cursor = max(cursor, stop)
    return chunks


def _npz_chunks(path: Path, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start index, (b, H, W, 3) uint8 images) of a finished out's arr_0, streamed."""
    start = 0
    for images in npz_image_batches(path, batch_size):
        yield start, images
        start += len(images)


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _write_pngs(images: np.ndarray, start: int, png_dir: Path, digits: int) -> None:
    """images (n, H, W, 3) uint8 -> png_dir/<start + i>.png, skipping files already there."""
    from PIL import Image

    for i, image in enumerate(images):
        path = png_dir / f"{start + i:0{digits}d}.png"
        if not path.is_file():
            with files.atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------
# The ADM-layout npz, streamed from the shards
# ---------------------------------------------------------------------------------------------
def _write_npy_member(
    zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterator[np.ndarray]
) -> None:
    """One `name`.npy member (C order), its data written chunk by chunk: what np.savez writes for
    the whole array at once, without holding it. Header version 1.0 (2.0 if it does not fit)."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        try:
            np.lib.format.write_array_header_1_0(f, header)
        except ValueError:
            np.lib.format.write_array_header_2_0(f, header)
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def _merge(parts: Path, out: Path, num_samples: int, png_dir: Path | None, digits: int) -> None:
    """The shards of `parts` (which must tile [0, N) exactly) -> `out` (arr_0 images, arr_1 labels)."""
    done = _done_ranges(parts)
    cursor = 0
    for start, stop in done:
        if start != cursor:
            raise RuntimeError(
                f"fastdae sample: shards in {parts} do not tile [0, {num_samples}): "
                f"{'overlap' if start < cursor else 'gap'} at {min(start, cursor)}"
            )
        cursor = stop
    if cursor != num_samples:
        raise RuntimeError(f"fastdae sample: shards in {parts} end at {cursor}, expected {num_samples}")
    shards = [parts / _shard_name(a, b) for a, b in done]
    with np.load(shards[0]) as first:
        image_shape, has_labels = first["images"].shape[1:], "labels" in first.files

    def field(name: str) -> Iterator[np.ndarray]:
        for (start, _), file in zip(done, shards, strict=True):
            with np.load(file) as shard:
                data = shard[name]
            if name == "images" and png_dir is not None:
                _write_pngs(data, start, png_dir, digits)
            yield data

    with (
        files.atomic_path(out) as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        _write_npy_member(zf, "arr_0", (num_samples, *image_shape), np.dtype(np.uint8), field("images"))
        if has_labels:
            _write_npy_member(zf, "arr_1", (num_samples,), np.dtype(np.int64), field("labels"))


def _same_settings(recorded: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether samples recorded with `recorded` settings are those `current` asks for; a setting the
    record lacks (added since: SETTINGS_SINCE) is unchanged at its default."""
    return recorded is not None and not differences(recorded, current, SETTINGS_SINCE)


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------
def sample(
    run: str | os.PathLike,
    num_samples: int = 50_000,
    out: str | os.PathLike = "samples.npz",
    png_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    cfg_scale: float | None = None,
    seed: int = 0,
    labels: str = "balanced",
    steps: int | None = None,
    sampler: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Generate `num_samples` images from the run folder `run` into `out` (see the module docstring);
    returns `out`. cfg_scale, steps, sampler default to the run's prior config; labels "balanced" or
    "random" (class-conditional DiTs). Under torchrun every rank calls this with the same arguments."""
    _check_arguments(num_samples, batch_size, seed, cfg_scale, steps)
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"sample: out must be a .npz file, got {out}")
    if out.is_dir():
        raise ValueError(f"sample: out {out} is a folder; it must be a .npz file")
    _check_device(device)
    r = open_run(run, device)
    s = build_sampler(r, steps, sampler, cfg_scale)
    if labels not in LABEL_MODES:  # before anything is written
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    settings = {"num_samples": num_samples, "seed": seed, "labels": labels, **s.identity}
    with exclusive(out, r.dist):
        return _sample_locked(r, s, out, Path(png_dir) if png_dir is not None else None, settings, batch_size, progress)


def _sample_locked(
    r: Run, s: Sampler, out: Path, png_dir: Path | None, settings: dict[str, Any], batch_size: int, progress: bool
) -> Path:
    """sample() once this process holds out's lock (rank 0; the other ranks follow it)."""
    from tqdm import tqdm

    d, dev = r.dist, r.device
    num_samples, seed = settings["num_samples"], settings["seed"]
    digits = max(6, len(str(num_samples - 1)))
    sidecar = out.with_name(out.name + ".json")
    if out.is_file():
        previous = files.read_json_object(sidecar) or {}
        if not _same_settings(previous.get("settings"), settings):
            raise FileExistsError(
                f"sample: {out} holds samples of other settings (or was not written by fastdae "
                f"sample: no readable {sidecar.name}); remove it or pick another --out"
            )
        if png_dir is not None and d.is_main:  # complete: the PNGs asked for now come from it
            png_dir.mkdir(parents=True, exist_ok=True)
            for start, images in _npz_chunks(out, batch_size):
                _write_pngs(images, start, png_dir, digits)
        return out  # already complete
    parts = out.with_name(out.name + PARTS_SUFFIX)
    settings_file = parts / SETTINGS_FILE
    if settings_file.exists() and not _same_settings(files.read_json_object(settings_file), settings):
        raise FileExistsError(
            f"sample: {parts} holds partial samples of other settings ({settings_file}); "
            f"remove it or pick another --out"
        )
    if parts.exists() and not settings_file.exists() and (not parts.is_dir() or any(parts.iterdir())):
        # fastdae writes settings.json first: this is someone else's, and it is removed when done
        raise FileExistsError(
            f"sample: {parts} was not written by fastdae sample (no {SETTINGS_FILE}); pick another --out"
        )
    _check_disk(out, num_samples, r.cfg.data.size)
    all_labels = sample_labels(num_samples, s.num_classes, settings["labels"], seed)
    done = _done_ranges(parts) if parts.is_dir() else []
    todo = _todo_chunks(num_samples, done, batch_size)
    d.barrier()  # every rank has listed the shards before any rank writes one
    if d.is_main:
        parts.mkdir(parents=True, exist_ok=True)
        files.write_json(settings_file, settings)
    d.barrier()
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)

    this_run = sum(b - a for a, b in todo)
    bar = tqdm(
        total=num_samples,
        initial=num_samples - this_run,
        unit="img",
        desc="sample",
        disable=not (progress and d.is_main),
    )
    t0 = time.perf_counter()
    for start, stop in todo[d.rank :: d.world_size]:
        y = all_labels[start:stop] if all_labels is not None else None
        images = s.generate(stop - start, y, [sample_generator(seed, i, dev) for i in range(start, stop)]).numpy()
        if png_dir is not None:
            _write_pngs(images, start, png_dir, digits)
        shard = {"images": images, **({"labels": y.numpy()} if y is not None else {})}
        _save_npz_atomic(parts / _shard_name(start, stop), **shard)  # last: a shard on disk is complete
        bar.update(min((stop - start) * d.world_size, bar.total - bar.n))
    bar.close()
    d.barrier()  # every rank's shards are on disk
    elapsed = time.perf_counter() - t0
    if d.is_main:
        _merge(parts, out, num_samples, png_dir, digits)
        files.write_json(
            sidecar,
            {
                "settings": settings,
                "time_s": elapsed,
                "samples_this_run": this_run,
                "samples_per_s": this_run / elapsed if this_run else None,
                "world_size": d.world_size,
                "device": str(dev),
            },
        )
        shutil.rmtree(parts)
    d.barrier()
    return out
