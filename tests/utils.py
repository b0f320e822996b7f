"""Shared test helpers: numerics for kernel tests (flash-attention's rule: a kernel's error against a
float64 reference may be at most 2x the error plain torch makes in the same dtype, plus a floor), and
the tiny trainer config, log reader and folder snapshot of the training tests, and the encode
functions, index-carrying dataset and small-shard `build` of the latent cache tests, the
subprocess that runs benchmark files as `pytest benchmarks/` does, and a script run under torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fastdae.cache import LatentCache
from fastdae.config import TrainConfig, apply_overrides, preset

REPO = Path(__file__).resolve().parents[1]
# how the benchmarks are sized: set per call of run_benchmarks, never inherited
BENCH_ENV = ("FASTDAE_BENCH_QUICK", "FASTDAE_BENCH_SIZE")

# floor of the relative error allowed, per dtype of the inputs
ERR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64; inf when a has NaN/Inf."""
    a64, r64 = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a64).all():
        return float("inf")
    denom = r64.norm().item()
    return (a64 - r64).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, name: str = "") -> None:
    """out (kernel) vs ref64 (float64 reference); torch_out is plain torch in out's dtype."""
    dtype = out.dtype
    budget = 2 * rel_err(torch_out, ref64) + ERR_FLOOR.get(dtype, 1e-5)
    err = rel_err(out, ref64)
    assert err <= budget, f"{name}: rel err {err:.3g} > budget {budget:.3g} ({dtype})"


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN, so an unwritten element fails the test."""
    return torch.full_like(t, float("nan"))


def tiny(out: Path, *overrides: str) -> TrainConfig:
    """The `tiny` preset writing to `out`, with "key=value" overrides."""
    return apply_overrides(preset("tiny"), [f"out_dir={out}", *overrides])


def read_log(path: Path) -> list[dict[str, str]]:
    """A stage's log.csv as a list of rows."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# a two-step stage 1 with a checkpoint at its end, for resume and identity tests
STAGE1 = ["stages=stage1", "stage1.steps=2", "stage1.ckpt_every=2", "stage1.log_every=1"]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes): what a refused call must leave unchanged."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the latent cache tests (tests/cache/) ---------------------------------------------------------
_GEN = torch.Generator().manual_seed(1234)
MIX = torch.randn(4, 3, generator=_GEN)
CODEBOOK = torch.randn(300, 4, generator=_GEN)


def encode_latent(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", MIX, F.avg_pool2d(x, 4))  # (B, 4, H/4, W/4)


def encode_vq(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    z = encode_latent(x).permute(0, 2, 3, 1)  # (B, h, w, 4)
    indices = torch.cdist(z.reshape(len(x), -1, 4), CODEBOOK[None].expand(len(x), -1, -1)).argmin(-1)
    indices = indices.reshape(z.shape[:3])  # (B, h, w) int64
    return {"indices": indices}, CODEBOOK[indices].permute(0, 3, 1, 2)


def encode_kl(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    mean = encode_latent(x)
    return {"mean": mean, "logvar": -mean.abs() - 1}, mean


class IndexImages(Dataset):
    """Tiny (3, 4, 4) images whose pixels encode their index, so an encode fn can recover it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.full((3, 4, 4), i / 1000.0)
        image[:, :, 0] = -1.0  # the left column tells flipped copies apart
        return image, torch.tensor(i % 3)


def index_of(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x[:, 0, 0, 1:3].mean(-1) * 1000).long()  # (B,) columns 1, 2 in either orientation


def encode_index(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """value = index (+1000 for flipped images); stats latent (B, 2, 1, 2) from the pixels."""
    value = index_of(x) + 1000 * (x[:, 0, 0, -1] == -1).long()
    return {"value": value}, x[:, :2, :1, :2].clone()


def build(root, dataset, encode=encode_index, **kw) -> LatentCache:
    kw = {
        "batch_size": 8,
        "shard_size": 16,
        "encoder_sha256": "enc",
        "dataset_fingerprint": "data",
        "progress": False,
        **kw,
    }
    return LatentCache.build(root, dataset, encode, **kw)


def content(manifest: dict) -> dict:
    """A manifest without what legitimately differs between builds: file names, timings (and so its checksum)."""
    m = {k: v for k, v in manifest.items() if k not in ("build", "checksum")}
    m["shards"] = [{k: v for k, v in s.items() if k != "file"} for s in m["shards"]]
    return m


def stats_reference(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = latents.double().transpose(0, 1).reshape(latents.shape[1], -1)  # (C, N h w)
    return x.mean(1), x.std(1, unbiased=False)


def reseal(manifest: dict) -> str:
    """A manifest's text with its checksum recomputed: sha256 of the body (every key but "checksum")
    as compact JSON with sorted keys."""
    import hashlib

    body = {k: v for k, v in manifest.items() if k != "checksum"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return json.dumps({**body, "checksum": digest})


def run_benchmarks(target: Path, tmp_path: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """`pytest <target> --benchmark-disable` (each member called once, untimed) in a subprocess, as
    `pytest benchmarks/` runs it (benchmarks/conftest.py, not tests/'), with `env` set. Without
    TRITON_INTERPRET: the benchmarks' CPU paths are C++ / torch, as a user runs them."""
    base = {k: v for k, v in os.environ.items() if k not in (*BENCH_ENV, "TRITON_INTERPRET")}
    cmd = [sys.executable, "-m", "pytest", str(target), "--benchmark-disable", "-q", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*cmd, f"--basetemp={tmp_path / 'pytest'}"],
        cwd=REPO,
        env={**base, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def torchrun(script: Path, *args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 script args...` (one node, 2 gloo ranks, one thread
    each) from this checkout; never raises on a failed run (the caller asserts on returncode)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    return subprocess.run(
        [*cmd, *(str(a) for a in args)],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
