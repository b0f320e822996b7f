"""Stage 2's targets at 256 px: images/s decoded from a folder of JPEGs vs read from the decoded-image
cache (fastdae.cache.images), num_workers 0, 1, 2; and the image cache's build rate and size on disk.

    python benchmarks/bench_loader.py --images 3000 --out benchmarks/results --name loader-2026-12-06

The JPEG folder is made on the fly under <tempdir>/fastdae-jpegs (never committed): --images files of
--width x --height (default 400 x 350, near ImageNet's mean), smooth random content plus noise,
quality 90. ImageFolder(size=256) resizes the shorter side to 256 (bicubic) and center-crops.

Two loaders, each over the same ascending batches of --batch images of one pass, for both sources:
  dataloader  torch DataLoader with `num_workers` worker processes (0: in the main process), a whole
              batch per __getitems__ call; the mechanism the cache stage and stage 1 read images with.
  stage2      LatentCache.paired_loader(source, batch, num_workers=w): stage 2's own loader (gather
              threads; stage 2 runs max(1, num_workers) of them, so w = 0 and 1 are the same), with
              the image cache read as stage 2 reads it: uint8, made floats on the training device
              (`uint8_to_float_ms_per_batch` is what that costs when the device is this CPU).
Images/s counts the batches after the first (worker start-up is not steady state), over --repeats
passes: best and median. Both sources are in the OS page cache (just written or read): the figures
are decode vs copy, without disk reads (a cold cache reads 196,608 bytes per 256 px image, a JPEG
file its own size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fastdae.cache import LatentCache
from fastdae.cache.format import index_space, no_collate
from fastdae.cache.images import ImageCache, build_images, to_signed_unit
from fastdae.data import ImageFolder, dataset_fingerprint


def make_jpegs(root: Path, n: int, width: int, height: int) -> None:
    """n JPEGs: a random 1/8-scale image upsampled (smooth regions and edges, as in photos) plus noise."""
    if (root / ".complete").is_file() and (root / ".complete").read_text() == f"{n} {width} {height}":
        return
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
        big = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / f"{i:06d}.jpg", quality=90)
    (root / ".complete").write_text(f"{n} {width} {height}")


def _rate(batches: Any, batch: int) -> float:
    """Images/s of the batches after the first."""
    it = iter(batches)
    next(it)
    t0, n = time.perf_counter(), 0
    for b in it:
        n += len(b[1] if isinstance(b, tuple) and isinstance(b[0], dict) else b[0])
    return n / (time.perf_counter() - t0)


def dataloader_rate(source: Any, n: int, batch: int, workers: int) -> float:
    batches = [list(range(a, a + batch)) for a in range(0, n - batch + 1, batch)]
    loader = DataLoader(source, batch_sampler=batches, num_workers=workers, collate_fn=no_collate)
    return _rate(loader, batch)


def stage2_rate(latents: LatentCache, source: Any, batch: int, workers: int) -> float:
    return _rate(latents.paired_loader(source, batch, shuffle=False, num_workers=workers), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=350)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="loader")
    args = parser.parse_args()
    torch.set_num_threads(1)

    jpegs, work = args.tmp / "fastdae-jpegs", Path(tempfile.mkdtemp(dir=args.tmp, prefix="fastdae-loader-"))
    t0 = time.perf_counter()
    make_jpegs(jpegs, args.images, args.width, args.height)
    print(f"jpegs: {args.images} in {time.perf_counter() - t0:.1f} s")
    folder = ImageFolder(jpegs, args.size, cache_dir=work / "index")
    fp = dataset_fingerprint(folder)
    load = [os.getloadavg()[0]]

    t0 = time.perf_counter()
    build_images(work / "images", folder, dataset_fingerprint=fp, batch_size=args.batch, progress=False)
    build_s = time.perf_counter() - t0
    images = ImageCache(work / "images", dataset_fingerprint=fp, flip=False, image_size=folder.image_size)
    images_u8 = ImageCache(
        work / "images", dataset_fingerprint=fp, flip=False, image_size=folder.image_size, uint8=True
    )
    shard_bytes = sum(p.stat().st_size for p in (work / "images").glob("shard-*.safetensors"))
    # a stand-in latent cache (one tiny field) for stage 2's paired loader: only the images are measured
    latents = LatentCache.build(
        work / "latents",
        folder,
        lambda x: ({"z": x[:, :1, :1, :1]}, x[:, :1, :1, :1]),
        encoder_sha256="stand-in",
        dataset_fingerprint=fp,
        batch_size=args.batch,
        progress=False,
    )
    print(f"image cache: {build_s:.1f} s, {shard_bytes / args.images:.0f} bytes/image")
    load.append(os.getloadavg()[0])

    rows = []
    for loader in ("dataloader", "stage2"):
        for workers in [int(w) for w in args.workers.split(",")]:
            for name, source in (("jpeg", folder), ("image cache", images)):
                rates = []
                for _ in range(args.repeats):
                    if loader == "dataloader":
                        rates.append(dataloader_rate(index_space(source, False), args.images, args.batch, workers))
                    else:
                        rates.append(
                            stage2_rate(latents, images_u8 if source is images else source, args.batch, workers)
                        )
                    load.append(os.getloadavg()[0])
                row = {
                    "loader": loader,
                    "source": name,
                    "num_workers": workers,
                    "images_per_s_best": max(rates),
                    "images_per_s_median": statistics.median(rates),
                    "runs": rates,
                }
                rows.append(row)
                print(json.dumps(row))

    pixels = images_u8.__getitems__(list(range(args.batch)))[0]
    convert = []
    for _ in range(5):
        t0 = time.perf_counter()
        to_signed_unit(pixels)
        convert.append((time.perf_counter() - t0) * 1e3)
    info = {
        "uint8_to_float_ms_per_batch": {"min": min(convert), "median": statistics.median(convert)},
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": __import__("PIL").__version__,
        "torch_threads": 1,
        "load_average_1min": {"min": min(load), "max": max(load), "samples": load},
        "images": args.images,
        "jpeg_size": [args.width, args.height],
        "jpeg_bytes_mean": sum(p.stat().st_size for p in jpegs.glob("*.jpg")) / args.images,
        "size": args.size,
        "batch": args.batch,
        "repeats": args.repeats,
        "image_cache_build_s": build_s,
        "image_cache_build_images_per_s": args.images / build_s,
        "image_cache_bytes_per_image": shard_bytes / args.images,
        "rows": rows,
    }
    subprocess.run(["rm", "-rf", str(work)], check=True)
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(info, indent=1) + "\n")
        (args.out / f"{args.name}.md").write_text(markdown(info, args.name))


def markdown(info: dict[str, Any], name: str) -> str:
    """The json's table (the prose around it is written by hand in the committed .md)."""
    load = info["load_average_1min"]
    lines = [
        "| loader | num_workers | JPEG folder: images/s best / median | image cache: images/s best / median | "
        "speed-up (median) |",
        "|---|---|---|---|---|",
    ]
    rows = {(r["loader"], r["num_workers"], r["source"]): r for r in info["rows"]}
    for loader, workers in sorted({(r["loader"], r["num_workers"]) for r in info["rows"]}):
        jpeg, cache = rows[(loader, workers, "jpeg")], rows[(loader, workers, "image cache")]
        lines.append(
            f"| {loader} | {workers} | {jpeg['images_per_s_best']:.0f} / {jpeg['images_per_s_median']:.0f} | "
            f"{cache['images_per_s_best']:.0f} / {cache['images_per_s_median']:.0f} | "
            f"{cache['images_per_s_median'] / jpeg['images_per_s_median']:.0f}x |"
        )
    return (
        "\n".join(
            [
                f"<!-- {name}: table written by benchmarks/bench_loader.py; {info['cpu']}, {info['cpus']} CPUs, "
                f"1-min load {load['min']:.1f}-{load['max']:.1f} -->",
                *lines,
            ]
        )
        + "\n"
    )


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
