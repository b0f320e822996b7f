"""ImageFolder at ImageNet-like file counts: index build (cold), cached load (warm), fingerprint,
and peak memory, on a synthetic tree of tiny PNGs (1000 class folders; nothing downloaded).

    python benchmarks/folder_index.py --files 100000 --out benchmarks/results   # tree: <tempdir>/fastdae-tree
    python benchmarks/folder_index.py --files 1281167 --links --device cpu-NAME-1.28M --out benchmarks/results

`--links` makes every file of a class folder a hard link to one tiny PNG: ImageNet's 1,281,167 names
in a minute and 1,000 inodes. The index and the fingerprint only list and stat names (the 8
fingerprint probes read their file), so links time them as distinct files would, except that a cold
disk's inode reads are missing: a folder's names share one inode (run it on warm OS caches, as the
default tree is).

Each step runs twice in fresh subprocesses: once timed (wall time after the imports, and the
process's peak RSS, torch's import included), once under tracemalloc for the peak Python heap
(counted from after the imports; it also sees numpy's buffers). Steps that use the cache run
after "cold" has written it; the tree's directories are dated a minute back so it is cacheable.
`--old REV` also times the ImageFolder of a git revision (it read every file's header at
construction) on the same tree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 1000

# one child process per measurement; prints a JSON line
_CHILD = r"""
import json, resource, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
mode, tree, trace, size = sys.argv[2], sys.argv[3], sys.argv[4] == "trace", 32
if mode == "old":
    from old_data import ImageFolder
else:
    from fastdae.data import ImageFolder, dataset_fingerprint
if trace:  # after the imports: only what the index costs (tracing slows allocations: not timed)
    tracemalloc.start()
t0 = time.perf_counter()
if mode == "old":
    ds = ImageFolder(tree, size, resize=True)
else:
    ds = ImageFolder(tree, size)
    if mode == "fingerprint":
        t0 = time.perf_counter()
        dataset_fingerprint(ds)
seconds = time.perf_counter() - t0
_, peak = tracemalloc.get_traced_memory()
index_bytes = 0 if mode == "old" else sum(a.nbytes for a in (ds.index.names, ds.index.offsets, ds.index.labels))
print(json.dumps({"mode": mode, "files": len(ds), "seconds": seconds, "peak_heap_bytes": peak,
                  "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "index_bytes": index_bytes}))
"""


def make_tree(root: Path, files: int, links: bool = False) -> None:
    """files tiny 8x8 PNGs in CLASSES folders (n{class:08d}/{class}_{k}.png, ImageNet-like names); with
    `links`, hard links to one PNG (see the module docstring)."""
    done = f"{files}{' links' if links else ''}"
    if (root / ".complete").is_file() and (root / ".complete").read_text() == done:
        return
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    per_class = -(-files // CLASSES)
    made = 0
    for c in range(CLASSES):
        folder = root / f"n{c:08d}"
        folder.mkdir(exist_ok=True)
        source = folder / ".source.png"  # one per class: ext4 allows 65,000 links to a file (hidden: not indexed)
        if links and not source.exists():
            Image.fromarray(np.full((8, 8, 3), c % 256, dtype=np.uint8)).save(source)
        for k in range(min(per_class, files - made)):
            path = folder / f"n{c:08d}_{k}.png"
            if path.exists():  # an interrupted earlier make_tree
                pass
            elif links:
                os.link(source, path)
            else:
                pixels = np.full((8, 8, 3), (c * 7 + k) % 256, dtype=np.uint8)
                Image.fromarray(pixels).save(path)
            made += 1
    (root / ".complete").write_text(done)
    past = time.time() - 60  # an old tree, as datasets are: the index may be cached
    for d in [root, *(p for p in root.iterdir() if p.is_dir())]:
        os.utime(d, (past, past))


def measure(mode: str, tree: Path, path: Path, env: dict) -> dict:
    """Seconds from an untraced run, then peak heap from a tracemalloc'd run of the same step ("old"
    runs once, traced: its minutes of header reads dwarf the tracing overhead)."""
    rows = []
    for trace in ("trace",) if mode == "old" else ("time", "trace"):
        if mode == "cold":  # each cold run starts without a cached index
            for f in Path(env["FASTDAE_INDEX_DIR"]).glob("*.npz"):
                f.unlink()
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), mode, str(tree), trace],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {**rows[0], "peak_heap_bytes": rows[-1]["peak_heap_bytes"]}


def repeat(mode: str, tree: Path, path: Path, env: dict, times: int) -> dict:
    """measure() `times` times: "seconds" is the min, "seconds_median" and "seconds_runs" beside it."""
    rows = [measure(mode, tree, path, env) for _ in range(times)]
    seconds = [r["seconds"] for r in rows]
    return {**rows[0], "seconds": min(seconds), "seconds_median": statistics.median(seconds), "seconds_runs": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "fastdae-tree")
    parser.add_argument("--out", type=Path, default=None, help="folder for <device>-folder-index.{json,md}")
    parser.add_argument("--old", default=None, help="a git revision whose ImageFolder to time too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per step (min and median reported)")
    parser.add_argument("--links", action="store_true", help="hard links to one PNG (see the module docstring)")
    args = parser.parse_args()

    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    make_tree(args.tree, args.files, args.links)
    print(f"tree: {args.files} files in {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FASTDAE_INDEX_DIR": tmp, "OMP_NUM_THREADS": "1"}
        rows = [repeat(mode, args.tree, REPO, env, args.repeats) for mode in ("cold", "warm", "fingerprint")]
        if args.old:
            (Path(tmp) / "old_data.py").write_text(
                subprocess.run(
                    ["git", "show", f"{args.old}:fastdae/data.py"], cwd=REPO, capture_output=True, text=True, check=True
                ).stdout
            )
            rows.append(measure("old", args.tree, Path(tmp), env))
    for r in rows:
        print(json.dumps(r))
    if args.out:
        info = {
            "load_average_1min": os.getloadavg()[0],
            "load_average_1min_at_start": load_start,
            "device": args.device,
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "files": args.files,
            "hard_links": args.links,
            "old_revision": args.old,
            "rows": rows,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"{args.device}-folder-index"
        stem.with_name(stem.name + ".json").write_text(json.dumps(info, indent=1) + "\n")
        lines = [
            f"# ImageFolder index: {args.files:,} files in {CLASSES} class folders ({args.device})",
            "",
            *(["Each class folder's files are hard links to one 8x8 PNG (`--links`).", ""] if args.links else []),
            "Written by `python benchmarks/folder_index.py`; each row a fresh process; warm OS file caches "
            "(the tree was just listed); a shared machine, 1-minute load average "
            f"{info['load_average_1min_at_start']:.1f} at the start and {info['load_average_1min']:.1f} at the end, so "
            "seconds are noisy.",
            "",
            f"| step | seconds (min / median of {args.repeats}) | peak Python heap (MB) | peak RSS (MB) | "
            "index arrays (bytes/file) |",
            "|---|---|---|---|---|",
        ]
        names = {
            "cold": "build (no cached index)",
            "warm": "construct (cached index)",
            "fingerprint": "dataset_fingerprint (stat per file + 8 probes)",
            "old": f"old ImageFolder ({args.old}: header read per file)",
        }
        for r in rows:
            per = f"{r['index_bytes'] / r['files']:.1f}" if r["index_bytes"] else "-"
            lines.append(
                f"| {names[r['mode']]} | {r['seconds']:.2f} / {r.get('seconds_median', r['seconds']):.2f} | "
                f"{r['peak_heap_bytes'] / 1e6:.1f} | "
                f"{r['max_rss_bytes'] / 1e6:.0f} | {per} |"
            )
        stem.with_name(stem.name + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
