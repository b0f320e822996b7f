"""What a stage reports: log.csv (+ TensorBoard / W&B, progress bar) every log_every steps with
images/s, the NaN/Inf guard at those steps (the only host syncs besides logging), the PNG grids
(also sent to TensorBoard / W&B, with the batch's reconstructions at every checkpoint step), the
run's curves.png (every stage's losses), and notices said once per run folder."""

from __future__ import annotations

import csv
import importlib
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastdae import files
from fastdae.threads import StallWatch, apply_threads
from fastdae.training.optim import check_finite
from fastdae.training.run import Run, log

EVAL_IMAGES = 256  # the fixed evaluation set: the first items of the dataset
EVAL_BATCH = 64
GRID_PAIRS = 8
MIN_GRID_SIDE = 256  # px: PNG grids are nearest-upscaled to at least this, so 32x32 images stay readable
CURVE_STAGES = ("stage1", "stage2", "prior")  # the stages with a log.csv
# log.csv columns that are not loss terms (the adaptive GAN weight lambda is a weight, not a loss)
NOT_LOSSES = ("step", "images_per_s", "time_s", "lr", "grad_norm", "lambda")


class CSVLog:
    """log.csv of one stage. On resume from step s, rows after s (written before a crash) are dropped,
    so the file is the loss curve of the run as if it had never stopped. Columns are the union of
    all rows' keys (GAN terms appear after the warm-up); a new column rewrites the file."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="") as f:
                self.rows = [
                    {k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f) if int(r["step"]) <= resume_step
                ]
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

    def __init__(
        self, run: Run, stage: str, steps: int, start: int, log_every: int, ckpt_every: int, images_per_step: int
    ) -> None:
        from tqdm import tqdm

        self.run, self.stage, self.steps, self.start = run, stage, steps, start
        self.log_every, self.ckpt_every, self.images = log_every, ckpt_every, images_per_step
        main = run.dist.is_main
        self.csv = CSVLog(run.log_csv(stage), start) if main else None
        self.trackers = Trackers(run, stage)
        self.bar = tqdm(total=steps, initial=start, desc=stage, unit="step", disable=not (run.cfg.progress and main))
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=run.device)
        self.last: dict[str, float] = {}
        self.wait = 0.0
        if run.device.type == "cpu":  # the `threads` key, and a watch for a machine that gets busy (docs/cpu.md)
            apply_threads(run.cfg.threads)
        self.stall = StallWatch(stage, enabled=run.device.type == "cpu", may_drop=run.cfg.threads == 0)
        self.t0 = self.t_log = time.perf_counter()
        self.step_log = start

    def due(self, done: int) -> bool:
        return done % self.log_every == 0 or done % self.ckpt_every == 0 or done == self.steps

    def batch(self, batches: Iterator[Any]) -> Any:
        t = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - t
        return batch

    def step(self, done: int, losses: dict[str, Tensor], images: tuple[Tensor, Tensor] | None = None) -> None:
        """After step `done`: losses (with "loss"); images: the batch and its reconstructions (B, 3, H, W),
        shown in TensorBoard / W&B at checkpoint steps."""
        self.nonfinite |= ~torch.isfinite(losses["loss"].detach())
        self.bar.update(1)
        self.stall.tick()
        if not self.due(done):
            return
        if images is not None and (done % self.ckpt_every == 0 or done == self.steps):
            x, x_hat = (t[:GRID_PAIRS] for t in images)
            self.trackers.image("reconstructions", torch.cat([x, x_hat]), done, nrow=len(x))
        check_finite(self.nonfinite, self.stage, done, self.run.dist)
        now = time.perf_counter()
        self.last = {k: float(v) for k, v in losses.items()}
        rate = self.images * (done - self.step_log) / max(now - self.t_log, 1e-9)
        self.t_log, self.step_log = now, done
        if self.csv is not None:
            self.csv.write(
                {
                    "step": done,
                    **{k: f"{v:.6g}" for k, v in self.last.items()},
                    "images_per_s": f"{rate:.1f}",
                    "time_s": f"{now - self.t0:.2f}",
                }
            )
        self.trackers.scalars(self.last, done)
        self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", img_s=f"{rate:.0f}")

    def finish(self) -> dict[str, Any]:
        self.bar.close()
        self.trackers.close()
        elapsed, ran = time.perf_counter() - self.t0, self.steps - self.start
        return {
            "steps": self.steps,
            "steps_this_run": ran,
            "time_s": elapsed,
            "images_per_s": self.images * ran / elapsed if ran else None,
            "loader_wait_fraction": self.wait / elapsed if ran else None,
            "final": self.last,
        }


class Trackers:
    """TensorBoard (<stage>/tb) and Weights & Biases (the run `fastdae.train` started) on rank 0, each
    when its config key is true (the packages are checked up front: config.check_environment).
    W&B gets `<stage>/step` with every entry: the x-axis to plot a stage's curves against."""

    def __init__(self, run: Run, stage: str) -> None:
        main, cfg = run.dist.is_main, run.cfg
        self.stage = stage
        self.tb = None
        if cfg.tensorboard and main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.stage_dir(stage) / "tb"))
        self.wandb = importlib.import_module("wandb") if cfg.wandb and main else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{self.stage}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{self.stage}/step": step, **{f"{self.stage}/{k}": v for k, v in values.items()}})

    def image(self, name: str, images: Tensor, step: int, nrow: int | None = None) -> None:
        """(B, 3, H, W) in [-1, 1] as one grid image (save_grid's layout) named <stage>/<name>."""
        if self.tb is None and self.wandb is None:
            return
        grid = grid_image(images, nrow).numpy()  # (H', W', 3) uint8
        if self.tb is not None:
            self.tb.add_image(f"{self.stage}/{name}", grid, step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.log({f"{self.stage}/step": step, f"{self.stage}/{name}": self.wandb.Image(grid)})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def grid_image(images: Tensor, nrow: int | None = None) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> one (H', W', 3) uint8 grid, nrow images per row (default:
    square-ish), 1-pixel gaps."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    B, _, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    grid = torch.zeros(3, ncol * (H + 1) + 1, nrow * (W + 1) + 1, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, 1 + r * (H + 1) : 1 + r * (H + 1) + H, 1 + c * (W + 1) : 1 + c * (W + 1) + W] = x[i]
    return grid.permute(1, 2, 0)


def upscale(grid: Tensor, min_side: int = MIN_GRID_SIDE) -> Tensor:
    """(H, W, C) -> nearest-upscaled by the smallest integer factor that makes both sides >= min_side
    (each pixel becomes an f x f block, so nothing is blurred)."""
    f = math.ceil(min_side / min(grid.shape[:2]))
    return grid if f <= 1 else grid.repeat_interleave(f, 0).repeat_interleave(f, 1)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """(B, 3, H, W) in [-1, 1] -> one PNG (grid_image), upscaled to a readable size."""
    from PIL import Image

    Image.fromarray(upscale(grid_image(images, nrow)).numpy()).save(path)
    return Path(path)


def notice_once(run: Run, key: str, message: str) -> None:
    """Log `message` the first time `key` comes up in this run folder (keys kept in run/notices.json):
    a condition that holds for every call of a run, such as "LPIPS is off", is said once, not on
    every start. Rank 0 only."""
    if not run.dist.is_main:
        return
    seen = files.read_json_object(run.notices_file) or {}  # an edited notices.json says them again
    if key in seen:
        return
    log.info(message)
    files.write_json(run.notices_file, {**seen, key: message})


def read_curves(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """The loss columns of one log.csv: column -> (steps, values), skipping rows where it is empty
    (GAN terms start after the warm-up)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k not in NOT_LOSSES and v not in ("", None):
                    steps, values = curves.setdefault(k, ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(v))
    return curves


def draw_curves(logs: dict[str, Path], path: Path) -> bool:
    """One panel per stage whose log.csv exists, every loss term against the step; False when
    matplotlib is missing (nothing is written)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state is touched
    except ImportError:
        return False
    stages = {s: read_curves(p) for s, p in logs.items() if p.is_file()}
    stages = {s: c for s, c in stages.items() if c}
    if not stages:
        return True
    fig = Figure(figsize=(4.5 * len(stages), 3.4))
    for ax, (stage, curves) in zip(fig.subplots(1, len(stages), squeeze=False)[0], stages.items(), strict=True):
        for name, (steps, values) in curves.items():
            ax.plot(steps, values, label=name, lw=1.2, marker="." if len(steps) < 20 else None)
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return True


def write_curves(run: Run) -> None:
    """run/curves.png from every stage's log.csv, or one notice per run folder without matplotlib."""
    if not run.dist.is_main:
        return
    if not draw_curves({s: run.log_csv(s) for s in CURVE_STAGES}, run.curves_file):
        notice_once(run, "curves", "curves.png not drawn: matplotlib is not installed (pip install 'fastdae[plots]')")


def eval_chunks(n: int) -> list[list[int]]:
    """Index chunks of the fixed evaluation set."""
    m = min(EVAL_IMAGES, n)
    return [list(range(a, min(a + EVAL_BATCH, m))) for a in range(0, m, EVAL_BATCH)]


@torch.no_grad()
def reconstruction_eval(
    pairs: Iterable[tuple[Tensor, Tensor]], path: Path, trackers: Trackers, step: int
) -> dict[str, float]:
    """L1 and PSNR (images in [-1, 1], so PSNR = 10 log10(4 / MSE)) over (x, x_hat) batches; a PNG with
    GRID_PAIRS originals over their reconstructions (also to `trackers` as eval_reconstructions at `step`)."""
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
    trackers.image("eval_reconstructions", torch.cat(shown), step, nrow=len(shown[0]))
    return {"l1": l1 / count, "psnr": 10 * math.log10(4.0 / max(se / count, 1e-12))}
