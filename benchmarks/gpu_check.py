"""The day a GPU is lent: GPU-marked correctness tests, then every benchmark group timed with CUDA
events, written to benchmarks/results/<device>-<date>.{json,md}. Run through gpu_check.sh.

    bash benchmarks/gpu_check.sh              # on a CUDA machine, from the source tree (~8 min on an H100)
    bash benchmarks/gpu_check.sh --dry-run    # anywhere: collects every group and checks none is missing

Timing: each benchmark warms up once (Triton compile + autotune, cuDNN plans, torch.compile), then
triton.testing.do_bench times it with CUDA events, flushing L2 before every run (benchmarks/
conftest.py: cuda_time); members of a group are compared by their median. Accuracy columns sit next
to each speed (attention and LPIPS: error vs float64 against plain torch's in the same dtype, the 2x
rule; VQ: whatever bench_vq.py records). The header records GPU name, clocks, power, allow_tf32 and
versions (NVML through nvidia-ml-py). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_FILES = [
    "benchmarks/bench_attention.py",
    "benchmarks/bench_vq.py",
    "benchmarks/bench_lpips.py",
    "benchmarks/bench_dit.py",
]
GPU_TESTS = ["tests"]
# the benchmark files import their helpers with `from conftest import ...`: benchmarks/ (not the
# tests' folder, which pyproject's pythonpath puts first) must be the conftest on sys.path
BENCH_PATH = ["-o", "pythonpath=benchmarks"]
# Every group the GPU run must have: (file, a substring every matching test id has), one per group
# family; the dry run fails when one matches no collected test.
EXPECTED = [
    ("bench_attention.py", "fwd-contiguous-N1024-D72-bfloat16-fastdae"),
    ("bench_attention.py", "fwd_bwd-contiguous-N4096-D128-bfloat16-sdpa-flash"),
    ("bench_attention.py", "fwd-contiguous-N1024-D64-bfloat16-sdpa-cudnn"),
    ("bench_attention.py", "fwd-contiguous-N1024-D64-bfloat16-sdpa-efficient"),
    ("bench_attention.py", "fwd-contiguous-N1024-D72-bfloat16-flex"),
    ("bench_attention.py", "fwd-contiguous-N1024-D72-bfloat16-xformers"),
    ("bench_attention.py", "fwd-fused-qkv-N1024-D72-bfloat16-fastdae"),
    ("bench_attention.py", "fwd_bwd-fused-qkv-N1024-D72-bfloat16-sdpa-flash"),
    ("bench_attention.py", "fwd-contiguous-N1024-D72-float32-fastdae"),
    ("bench_attention.py", "fwd_bwd-contiguous-N1024-D64-float32-sdpa-efficient"),
    ("bench_vq.py", "test_vq_nearest"),
    ("bench_vq.py", "test_vector_quantize_fwd_bwd"),
    ("bench_vq.py", "N65536-K16384"),
    ("bench_lpips.py", "test_lpips_head_fwd_bwd[256px-B16-torch-compile-torch.bfloat16]"),
    ("bench_lpips.py", "test_lpips_loss_fwd_bwd"),
    ("bench_dit.py", "DiT-XLwidth-d6"),
]


def _env(gpu_plan: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("TRITON_INTERPRET", None)
    if gpu_plan:  # parametrize the GPU cases without a GPU (collection only)
        env["FASTDAE_BENCH_DEVICE"] = "cuda"
    return env


def collect(gpu_plan: bool = True) -> tuple[list[str], list[str]]:
    """(benchmark test ids, GPU-marked test ids) as pytest collects them."""

    def ids(args: list[str]) -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
            cwd=ROOT,
            env=_env(gpu_plan),
            capture_output=True,
            text=True,
        )
        if proc.returncode not in (0, 5):  # 5: nothing collected
            raise RuntimeError(f"collection failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return [line for line in proc.stdout.splitlines() if "::" in line]

    return ids([*BENCH_PATH, *BENCH_FILES]), ids([*GPU_TESTS, "-m", "gpu"])


def dry_run() -> int:
    bench, gpu = collect()
    missing = [f"{f}: {s}" for f, s in EXPECTED if not any(f in t and s in t for t in bench)]
    files = {t.split("::")[0] for t in bench}
    print(f"collected {len(bench)} benchmark cases in {len(files)} files and {len(gpu)} GPU tests")
    for f in BENCH_FILES:
        print(f"  {f}: {sum(t.startswith(f) for t in bench)} cases")
    if missing or not gpu or len(files) != len(BENCH_FILES):
        print("missing:\n  " + "\n  ".join(missing or ["(GPU tests or a benchmark file)"]))
        return 1
    print("dry run ok: every expected group is collected")
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def markdown(data: dict, tests_rc: int, elapsed: float) -> str:
    """One table per group: members by CUDA-event median, speedup vs the group's baseline
    (fastdae's competitor: SDPA flash for attention, else the reference), accuracy columns."""
    benches = data["benchmarks"]
    info = benches[0]["extra_info"] if benches else {}
    keys = (
        "device",
        "sm_clock_mhz",
        "sm_clock_max_mhz",
        "mem_clock_mhz",
        "power_w",
        "power_limit_w",
        "temperature_c",
        "allow_tf32_matmul",
        "allow_tf32_cudnn",
        "driver",
        "cuda",
        "torch",
        "triton",
    )
    lines = [
        "# GPU check",
        "",
        f"GPU-marked tests: {'passed' if tests_rc == 0 else f'FAILED (pytest exit {tests_rc})'}; "
        f"total wall time {elapsed / 60:.1f} min.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        "| " + " | ".join(str(info.get(k, "-")) for k in keys) + " |",
        "",
        "Times: CUDA-event medians from triton.testing.do_bench (L2 flushed, warm-up and autotune excluded).",
        "",
    ]
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benches:
        groups[b["group"]].append(b)
    for group, members in sorted(groups.items()):

        def ms(b: dict) -> float:
            return b["extra_info"].get("cuda_median_ms", b["stats"]["median"] * 1e3)

        names = {b["extra_info"].get("member", b["name"]): b for b in members}
        base_name = "sdpa-flash" if group.startswith("attention") and "sdpa-flash" in names else "reference"
        base = names.get(base_name)
        lines += [f"## {group}", "", "| member | median ms | vs " + base_name + " | accuracy |", "|---|---|---|---|"]
        for name, b in sorted(names.items(), key=lambda kv: ms(kv[1])):
            e = b["extra_info"]
            acc = []
            if "max_err_vs_fp64" in e:
                acc.append(
                    f"err {e['max_err_vs_fp64']:.2e} (plain {e['plain_torch_err_vs_fp64']:.2e}, "
                    f"2x rule {'ok' if e['within_2x_rule'] else 'FAIL'})"
                )
            for k in ("argmin_agreement", "dist_rel_err_vs_fp64"):
                if k in e:
                    acc.append(f"{k} {e[k]:.3g}")
            ratio = f"{ms(base) / ms(b):.2f}x" if base is not None else "-"
            lines.append(f"| {name} | {ms(b):.3f} | {ratio} | {'; '.join(acc) or '-'} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run(out_dir: Path, budget_s: int) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run to check the plan on this machine")
        return 2
    start = time.time()
    env = _env(gpu_plan=False)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", *GPU_TESTS, "-m", "gpu", "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env
    )
    stem = f"{_slug(torch.cuda.get_device_name())}-{datetime.date.today().isoformat()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{stem}.json"
    bench = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *BENCH_PATH,
            *BENCH_FILES,
            "--benchmark-only",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--benchmark-json={raw}",
            "--benchmark-min-rounds=3",
            "--benchmark-max-time=0.05",
            "--benchmark-warmup=off",
        ],
        cwd=ROOT,
        env=env,
    )
    elapsed = time.time() - start
    data = json.loads(raw.read_text())
    (out_dir / f"{stem}.md").write_text(markdown(data, tests.returncode, elapsed))
    print(f"wrote {raw} and {raw.with_suffix('.md')} in {elapsed / 60:.1f} min")
    if elapsed > budget_s:  # results are kept; the plan should be trimmed
        print(f"gpu_check: took longer than its {budget_s / 60:.0f}-minute budget")
    return tests.returncode or bench.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="collect every group (no GPU needed) and exit")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--budget-s", type=int, default=8 * 60, help="warn when the whole check takes longer (results are kept)"
    )
    args = parser.parse_args(argv)
    return dry_run() if args.dry_run else run(Path(args.out), args.budget_s)


if __name__ == "__main__":
    raise SystemExit(main())
