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

`load_sampler(run_dir)` is the one function here that knows a run folder's layout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastdae.models.diffusion import SAMPLERS, Diffusion, Generators, LatentScaler, make_diffusion
from fastdae.models.dit import DiT

LABEL_MODES = ("balanced", "random")
PARTS_SUFFIX = ".parts"
SETTINGS_FILE = "settings.json"


@dataclass
class Sampler:
    """A trained prior + decoder, ready to turn labels and per-sample generators into images.

    scaler maps the DiT's unit-variance latents back to the decoder's; with a VQ bottleneck
    (`bottleneck` set) samples are snapped to their nearest code before decoding (DESIGN.md)."""

    dit: DiT
    decoder: nn.Module
    scaler: LatentScaler
    diffusion: Diffusion
    bottleneck: nn.Module | None  # the frozen VQ bottleneck, None for KL latents
    steps: int
    sampler: str
    cfg_scale: float
    precision: str
    device: torch.device
    identity: dict[str, Any]  # what the samples depend on besides the seed: weights' sha256, settings

    @property
    def num_classes(self) -> int:
        return self.dit.num_classes

    @torch.no_grad()
    def generate(self, n: int, labels: Tensor | None, generator: Generators) -> Tensor:
        """n images, (n, H, W, 3) uint8 on the CPU. labels (n,) or None (unconditional); generator: one
        for the batch, or one per sample (Diffusion.sample)."""
        from fastdae.train.loop import autocast

        B, C, h = n, self.dit.in_channels, self.dit.input_size
        y = labels.to(self.device) if labels is not None else None
        with autocast(self.device, self.precision):
            z = self.diffusion.sample(self.dit, (B, C, h, h), y=y, steps=self.steps, sampler=self.sampler,
                                      cfg_scale=self.cfg_scale, generator=generator, device=self.device)
        z = self.scaler.denormalize(z.float())  # (B, C, h, h) in the decoder's latent scale
        if self.bottleneck is not None:
            from fastdae import vq_nearest

            idx, _ = vq_nearest(z.permute(0, 2, 3, 1).reshape(-1, C), self.bottleneck.quantizer.codebook)  # (B*h*h,)
            z = self.bottleneck.latent({"indices": idx.view(B, h, h)})
        with autocast(self.device, self.precision):
            images = self.decoder(z).float()  # (B, 3, H, W) in [-1, 1]
        return to_uint8(images)


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU, rounded to the nearest level."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def load_sampler(run_dir: str | os.PathLike, device: torch.device, steps: int | None = None,
                 sampler: str | None = None, cfg_scale: float | None = None) -> Sampler:
    """The finished run's DiT (prior/dit.safetensors, EMA weights when the run kept them), its final
    decoder (stage 2's; stage 1's in mode "joint"), the cache's per-channel latent statistics and,
    for VQ, the frozen codebook. steps, sampler, cfg_scale default to the run's prior config.

    The only place in this module that knows the run folder's layout; it reuses the trainer's own
    readers (open_cache checks the cache against the encoder file it was built from)."""
    from fastdae.config import load_config
    from fastdae.models.autoencoder import build_decoder
    from fastdae.train import loop
    from fastdae.train.latents import load_frozen_bottleneck, open_cache
    from fastdae.train.prior import DIT_FILE, build_dit
    from fastdae.train.stage1 import DECODER_FILE

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"load_sampler: {config_file} does not exist: {run_dir} is not a fastdae run folder")
    cfg = load_config(config_file)
    ctx = loop.Context(cfg, run_dir, device, loop.Dist())
    dit_file = run_dir / "prior" / DIT_FILE
    decoder_file = run_dir / ("stage1" if cfg.mode == "joint" else "stage2") / DECODER_FILE
    for path in (dit_file, decoder_file):
        if not path.is_file():
            raise FileNotFoundError(f"load_sampler: {path} does not exist: the run's {path.parent.name} stage has "
                                    f"not finished")
    cache = open_cache(ctx)
    bottleneck = load_frozen_bottleneck(ctx)
    dit = build_dit(cfg, cfg.autoencoder.z_channels)
    loop.load_weights(dit_file, dit)
    decoder = build_decoder(cfg.autoencoder)
    loop.load_weights(decoder_file, decoder)
    p = cfg.prior
    settings = {"steps": p.sample_steps if steps is None else steps, "sampler": sampler or p.sampler,
                "cfg_scale": p.cfg_scale if cfg_scale is None else cfg_scale}
    if settings["sampler"] not in SAMPLERS or settings["steps"] < 1:
        raise ValueError(f"load_sampler: sampler must be one of {SAMPLERS} and steps >= 1, got {settings}")
    identity = {"run": str(run_dir.resolve()), "dit_sha256": loop.sha256_file(dit_file),
                "decoder_sha256": loop.sha256_file(decoder_file), "objective": p.objective, "schedule": p.schedule,
                "num_timesteps": p.num_timesteps, "precision": cfg.precision, **settings}
    return Sampler(dit=dit.to(device).eval(), decoder=decoder.to(device).eval(),
                   scaler=LatentScaler(cache.channel_mean, cache.channel_std).to(device),
                   diffusion=make_diffusion(p.objective, p.schedule, p.num_timesteps),
                   bottleneck=bottleneck if cfg.autoencoder.bottleneck == "vq" else None,
                   precision=cfg.precision, device=device, identity=identity, **settings)


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
    ranges = []
    for path in parts.glob("*-*.npz"):
        start, stop = path.stem.split("-")
        ranges.append((int(start), int(stop)))
    return sorted(ranges)


def _todo_chunks(num_samples: int, done: list[tuple[int, int]], batch_size: int) -> list[tuple[int, int]]:
    """The gaps between done ranges in [0, N), cut into [start, stop) chunks of at most batch_size."""
    chunks, cursor = [], 0
    for start, stop in [*done, (num_samples, num_samples)]:
        for a in range(cursor, start, batch_size):
            chunks.append((a, min(a + batch_size, start)))
        cursor = max(cursor, stop)
    return chunks


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _write_pngs(images: np.ndarray, start: int, png_dir: Path, digits: int) -> None:
    """images (n, H, W, 3) uint8 -> png_dir/<start + i>.png, skipping files already there."""
    from PIL import Image

    for i, image in enumerate(images):
        path = png_dir / f"{start + i:0{digits}d}.png"
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The ADM-layout npz, streamed from the shards
# ---------------------------------------------------------------------------------------------
def _write_npy_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype,
                      chunks: Iterator[np.ndarray]) -> None:
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
            raise RuntimeError(f"fastdae sample: shards in {parts} do not tile [0, {num_samples}): "
                               f"{'overlap' if start < cursor else 'gap'} at {min(start, cursor)}")
        cursor = stop
    if cursor != num_samples:
        raise RuntimeError(f"fastdae sample: shards in {parts} end at {cursor}, expected {num_samples}")
    files = [parts / _shard_name(a, b) for a, b in done]
    with np.load(files[0]) as first:
        image_shape, has_labels = first["images"].shape[1:], "labels" in first.files

    def field(name: str) -> Iterator[np.ndarray]:
        for (start, _), file in zip(done, files):
            with np.load(file) as shard:
                data = shard[name]
            if name == "images" and png_dir is not None:
                _write_pngs(data, start, png_dir, digits)
            yield data

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_npy_member(zf, "arr_0", (num_samples, *image_shape), np.dtype(np.uint8), field("images"))
        if has_labels:
            _write_npy_member(zf, "arr_1", (num_samples,), np.dtype(np.int64), field("labels"))
    os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------
def sample(run: str | os.PathLike, num_samples: int = 50_000, out: str | os.PathLike = "samples.npz",
           png_dir: str | os.PathLike | None = None, batch_size: int = 64, cfg_scale: float | None = None,
           seed: int = 0, labels: str = "balanced", steps: int | None = None, sampler: str | None = None,
           device: str = "auto", progress: bool = True) -> Path:
    """Generate `num_samples` images from the run folder `run` into `out` (see the module docstring);
    returns `out`. cfg_scale, steps, sampler default to the run's prior config; labels "balanced" or
    "random" (class-conditional DiTs). Under torchrun every rank calls this with the same arguments."""
    from tqdm import tqdm

    from fastdae.train import loop

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"sample: num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    d, dev = loop.setup_distributed(device)
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"sample: out must be a .npz file, got {out}")
    s = load_sampler(run, dev, steps, sampler, cfg_scale)
    settings = {"num_samples": num_samples, "seed": seed, "labels": labels, **s.identity}
    sidecar = out.with_name(out.name + ".json")
    if out.is_file():
        previous = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        if previous.get("settings") != settings:
            raise FileExistsError(f"sample: {out} holds samples of other settings (or was not written by fastdae "
                                  f"sample: no {sidecar.name}); remove it or pick another --out")
        return out  # already complete
    parts = out.with_name(out.name + PARTS_SUFFIX)
    settings_file = parts / SETTINGS_FILE
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise FileExistsError(f"sample: {parts} holds partial samples of other settings ({settings_file}); "
                              f"remove it or pick another --out")
    all_labels = sample_labels(num_samples, s.num_classes, labels, seed)
    done = _done_ranges(parts) if parts.is_dir() else []
    todo = _todo_chunks(num_samples, done, batch_size)
    d.barrier()  # every rank has listed the shards before any rank writes one
    if d.is_main:
        parts.mkdir(parents=True, exist_ok=True)
        loop.write_json(settings_file, settings)
    d.barrier()
    digits = max(6, len(str(num_samples - 1)))
    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)

    this_run = sum(b - a for a, b in todo)
    bar = tqdm(total=num_samples, initial=num_samples - this_run, unit="img", desc="sample",
               disable=not (progress and d.is_main))
    t0 = time.perf_counter()
    for start, stop in todo[d.rank::d.world_size]:
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
        loop.write_json(sidecar, {"settings": settings, "time_s": elapsed, "samples_this_run": this_run,
                                  "samples_per_s": this_run / elapsed if this_run else None,
                                  "world_size": d.world_size, "device": str(dev)})
        shutil.rmtree(parts)
    d.barrier()
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a finished run folder (config.yaml, prior/, stage2/, cache/)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--out", default="samples.npz", help="ADM-layout .npz: arr_0 uint8 (N, H, W, 3), arr_1 labels")
    p.add_argument("--png-dir", help="also write every sample as <index>.png here")
    p.add_argument("--batch-size", type=int, default=64, help="samples per DiT batch (per rank)")
    p.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance scale (default: the run's prior.cfg_scale)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's prior.sample_steps)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the run's prior.sampler")
    p.add_argument("--labels", choices=LABEL_MODES, default="balanced", help="class labels: cycled or random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def _cli_run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise SystemExit(f"fastdae sample: unrecognized arguments {extra}")
    try:
        out = sample(args.run, args.num_samples, args.out, args.png_dir, args.batch_size, args.cfg_scale, args.seed,
                     args.labels, args.steps, args.sampler, args.device)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"fastdae sample: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"samples: {out}")
    return 0


def register_cli() -> None:
    """Adds `sample` to fastdae.cli's subcommands."""
    from fastdae.cli import register

    register("sample", "generate N samples of a finished run as an ADM-evaluator .npz (resumable, torchrun-ready)",
             _cli_arguments, _cli_run)
