"""What a stage reports: log.csv (+ TensorBoard, progress bar) every log_every steps with images/s,
the NaN/Inf guard at those steps (the only host syncs besides logging), and the PNG grids."""
from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastdae import files
from fastdae.training.optim import check_finite
from fastdae.training.run import Run

EVAL_IMAGES = 256  # the fixed evaluation set: the first items of the dataset
EVAL_BATCH = 64
GRID_PAIRS = 8


class CSVLog:
    """log.csv of one stage. On resume from step s, rows after s (written before a crash) are dropped,
    so the file is the loss curve of the run as if it had never stopped. Columns are the union of
    all rows' keys (GAN terms appear after the warm-up); a new column rewrites the file."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="") as f:
                self.rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)
                             if int(r["step"]) <= resume_step]
        self.columns = list(dict.fromkeys(k for r in self.rows for k in r)) or ["step"]
        self._rewrite()

    def _rewrite(self) -> None:
        with files.atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not set(row) <= set(self.columns):
            self.columns = list(dict.fromkeys([*self.columns, *row]))
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="").writerow(row)


class StepLog:
    """Per-step bookkeeping of one stage from step `start` to `steps`: `batch` times the wait for
    data, `step(done, losses)` accumulates the NaN/Inf flag on the device and, at a log or checkpoint
    step (`due`), checks it and writes a row; `finish()` gives the stage's throughput metrics."""

    def __init__(self, run: Run, stage: str, steps: int, start: int, log_every: int, ckpt_every: int,
                 images_per_step: int) -> None:
        from tqdm import tqdm

        self.run, self.stage, self.steps, self.start = run, stage, steps, start
        self.log_every, self.ckpt_every, self.images = log_every, ckpt_every, images_per_step
        main = run.dist.is_main
        self.csv = CSVLog(run.log_csv(stage), start) if main else None
        self.tb = _tensorboard(run.stage_dir(stage)) if run.cfg.tensorboard and main else None
        self.bar = tqdm(total=steps, initial=start, desc=stage, unit="step", disable=not (run.cfg.progress and main))
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=run.device)
        self.last: dict[str, float] = {}
        self.wait = 0.0
        self.t0 = self.t_log = time.perf_counter()
        self.step_log = start

    def due(self, done: int) -> bool:
        return done % self.log_every == 0 or done % self.ckpt_every == 0 or done == self.steps

    def batch(self, batches: Iterator[Any]) -> Any:
        t = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - t
        return batch

    def step(self, done: int, losses: dict[str, Tensor]) -> None:
        self.nonfinite |= ~torch.isfinite(losses["loss"].detach())
        self.bar.update(1)
        if not self.due(done):
            return
        check_finite(self.nonfinite, self.stage, done, self.run.dist)
        now = time.perf_counter()
        self.last = {k: float(v) for k, v in losses.items()}
        rate = self.images * (done - self.step_log) / max(now - self.t_log, 1e-9)
        self.t_log, self.step_log = now, done
        if self.csv is not None:
            self.csv.write({"step": done, **{k: f"{v:.6g}" for k, v in self.last.items()},
                            "images_per_s": f"{rate:.1f}", "time_s": f"{now - self.t0:.2f}"})
        if self.tb is not None:
            for k, v in self.last.items():
                self.tb.add_scalar(f"{self.stage}/{k}", v, done)
        self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", img_s=f"{rate:.0f}")

    def finish(self) -> dict[str, Any]:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        elapsed, ran = time.perf_counter() - self.t0, self.steps - self.start
        return {"steps": self.steps, "steps_this_run": ran, "time_s": elapsed,
                "images_per_s": self.images * ran / elapsed if ran else None,
                "loader_wait_fraction": self.wait / elapsed if ran else None, "final": self.last}


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from e
    return SummaryWriter(str(out / "tb"))


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """(B, 3, H, W) in [-1, 1] -> one PNG, nrow images per row (default: square-ish), 1-pixel gaps."""
    from PIL import Image

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    B, _, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    grid = torch.zeros(3, ncol * (H + 1) + 1, nrow * (W + 1) + 1, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, 1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = x[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return Path(path)


def eval_chunks(n: int) -> list[list[int]]:
    """Index chunks of the fixed evaluation set."""
    m = min(EVAL_IMAGES, n)
    return [list(range(a, min(a + EVAL_BATCH, m))) for a in range(0, m, EVAL_BATCH)]


@torch.no_grad()
def reconstruction_eval(pairs: Iterable[tuple[Tensor, Tensor]], path: Path) -> dict[str, float]:
    """L1 and PSNR (images in [-1, 1], so PSNR = 10 log10(4 / MSE)) over (x, x_hat) batches; a PNG with
    GRID_PAIRS originals over their reconstructions."""
    l1 = se = count = 0.0
    shown: list[Tensor] = []
    for x, x_hat in pairs:
        x, x_hat = x.float().cpu(), x_hat.float().cpu().clamp(-1, 1)
        l1 += (x - x_hat).abs().sum().item()
        se += (x - x_hat).square().sum().item()
        count += x.numel()
        if not shown:
            shown = [x[:GRID_PAIRS], x_hat[:GRID_PAIRS]]
    save_grid(torch.cat(shown), path, nrow=len(shown[0]))
    return {"l1": l1 / count, "psnr": 10 * math.log10(4.0 / max(se / count, 1e-12))}
