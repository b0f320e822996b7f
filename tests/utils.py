"""Shared test helpers: numerics for kernel tests (flash-attention's rule: a kernel's error against a
float64 reference may be at most 2x the error plain torch makes in the same dtype, plus a floor), and
the tiny trainer config and log reader of the training tests."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from fastdae.config import TrainConfig, apply_overrides, preset

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
