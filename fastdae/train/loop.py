"""Shared training-loop machinery for every stage: distributed setup, step-indexed data order,
atomic checkpoints with exact resume, EMA, NaN/Inf guard, bf16 autocast, logging and PNG grids.

Exact resume rests on two rules: (1) the batch of global step s is a function of (seed, s) only
(`StepBatchSampler`, `LatentCache.loader(...).set_epoch`), and (2) the torch RNG is re-seeded at
the start of every step from (seed, stage, step, rank), so dropout, KL noise and diffusion noise do
not depend on how many steps ran in this process. Everything else that evolves (weights, optimizer
and scheduler state, EMA, BatchNorm buffers) is in the checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

LATEST = "latest"  # file naming the newest complete checkpoint directory
KEEP_CHECKPOINTS = 2


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; the run stopped without writing a checkpoint after it."""


# ---------------------------------------------------------------------------------------------
# Devices, distributed, precision
# ---------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str) -> tuple[Dist, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: join the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local), dev


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for "auto"/"bf16"; CPU runs fp32 unless "bf16" is asked for explicitly."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_ddp(module: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    if d.world_size == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def seed_step(seed: int, stage: str, step: int, rank: int) -> None:
    """Re-seed torch's RNGs (CPU and CUDA) from (seed, stage, step, rank): see the module docstring."""
    digest = hashlib.blake2b(f"{seed}/{stage}/{step}/{rank}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# ---------------------------------------------------------------------------------------------
# Data order as a function of (seed, step)
# ---------------------------------------------------------------------------------------------
class StepBatchSampler(Sampler[list[int]]):
    """Index batches for steps start_step, start_step + 1, ... (endless). Step s is batch s % E of
    epoch s // E (E = batches per epoch), epoch e is `np.random.default_rng([seed, e]).permutation(n)`
    and rank r takes every world_size-th index: the same convention as the latent cache's loader."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size
        self.per_epoch = (n // world_size) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"a dataset of {n} items over {world_size} rank(s) gives no full batch of {batch_size}")

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, b = divmod(step, self.per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            mine = order[: self.per_epoch * self.batch_size * self.world_size][self.rank::self.world_size]
            for b in range(b, self.per_epoch):
                yield mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()
                step += 1


def image_batches(dataset: Dataset, batch_size: int, seed: int, start_step: int, d: Dist,
                  num_workers: int, device: torch.device) -> Iterator[Any]:
    """Endless (images, labels) batches of `batch_size` per rank from global step `start_step`."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, d.rank, d.world_size)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                           pin_memory=device.type == "cuda", persistent_workers=num_workers > 0))


def per_rank_batch(batch_size: int, d: Dist, name: str) -> int:
    """The per-rank share of a global batch size."""
    if batch_size % d.world_size:
        raise ValueError(f"{name}={batch_size} must be divisible by the number of processes ({d.world_size})")
    return batch_size // d.world_size


def images_at(dataset: Dataset, indices: list[int]) -> Tensor:
    """(B, 3, H, W) images of dataset items."""
    return torch.stack([dataset[i][0] for i in indices])


def cache_batches(loader: Any, start_step: int) -> Iterator[Any]:
    """Endless batches of a LatentCache loader from global step `start_step` (its epochs advance by themselves)."""
    loader.set_epoch(start_step // len(loader), start_step % len(loader))
    while True:
        yield from loader


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------
# EMA, optimisation
# ---------------------------------------------------------------------------------------------
class EMA(nn.Module):
    """Exponential moving average of `source`'s parameters (buffers are copied), with the usual
    warm-up decay_t = min(decay, (1 + t) / (10 + t)) so short runs are not dominated by the init.
    Its state_dict is the averaged module's."""

    def __init__(self, source: nn.Module, decay: float) -> None:
        super().__init__()
        import copy

        self.decay = decay
        self.module = copy.deepcopy(unwrap(source)).eval().requires_grad_(False)
        self.__dict__["source"] = unwrap(source)  # a plain reference, not a registered submodule

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state, strict, assign)

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        src = self.source
        torch._foreach_lerp_(list(self.module.parameters()), list(src.parameters()), 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), src.buffers()):
            b_ema.copy_(b)


def make_optimizer(params: Iterable[Tensor], lr: float, betas: tuple[float, float] | list[float],
                   warmup_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam with a linear warm-up to `lr` over `warmup_steps`, then constant."""
    opt = torch.optim.Adam(params, lr=lr, betas=tuple(betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    return opt, sched


def optimizer_step(loss: Tensor, opt: torch.optim.Optimizer, sched: Any, params: list[Tensor], grad_clip: float) -> Tensor:
    """zero_grad -> backward -> clip -> step -> schedule; returns the pre-clip gradient norm (a tensor: no sync)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    opt.step()
    sched.step()
    return norm


# ---------------------------------------------------------------------------------------------
# Files: atomic weights, checkpoints, logs, grids
# ---------------------------------------------------------------------------------------------
def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights(path: str | os.PathLike, state: dict[str, Tensor]) -> Path:
    """Weights as safetensors, written to a temp name and renamed (readers never see a partial file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    _fsync_replace(tmp, path)
    return path


def load_weights(path: str | os.PathLike, module: nn.Module, prefix: str = "") -> None:
    """Load `prefix`-ed keys of a safetensors file into module (strict)."""
    state = load_file(str(path))
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    module.load_state_dict(state)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Checkpointer:
    """ckpt-<step>/ directories: <name>.safetensors per module + state.pt (optimizer, scheduler, step).

    A checkpoint is written into a temp directory, fsynced and renamed, then `latest` is replaced
    atomically to name it; so a SIGKILL at any point leaves the previous checkpoint valid."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, step: int, modules: dict[str, nn.Module], state: dict[str, Any]) -> Path:
        final = self.root / f"ckpt-{step:08d}"
        tmp = self.root / f".ckpt-{step:08d}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            save_weights(tmp / f"{name}.safetensors", unwrap(module).state_dict())
        torch.save({**state, "step": step}, tmp / "state.pt")
        _fsync_replace(tmp / "state.pt", tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = self.root / f".{LATEST}.tmp{os.getpid()}"
        pointer_tmp.write_text(final.name)
        _fsync_replace(pointer_tmp, self.root / LATEST)
        for old in sorted(self.root.glob("ckpt-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: Path, modules: dict[str, nn.Module]) -> dict[str, Any]:
        for name, module in modules.items():
            load_weights(path / f"{name}.safetensors", unwrap(module))
        return torch.load(path / "state.pt", weights_only=True)


class CSVLog:
    """log.csv of one stage. On resume from step s, rows after s (written before a crash) are dropped,
    so the file is the loss curve of the run as if it had never stopped. Columns are the union of
    all rows' keys (GAN terms appear after the warm-up); a new column rewrites the file."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                self.rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)
                             if int(r["step"]) <= resume_step]
        self.columns = list(dict.fromkeys(k for r in self.rows for k in r)) or ["step"]
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not set(row) <= set(self.columns):
            self.columns = list(dict.fromkeys([*self.columns, *row]))
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="").writerow(row)


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


EVAL_IMAGES = 256  # the fixed evaluation set: the first items of the dataset
EVAL_BATCH = 64
GRID_PAIRS = 8


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


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The stage loop
# ---------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """What one training stage plugs into `run_stage`. `step(batch, step) -> losses` does forward,
    backward and optimizer steps (a GAN step has two optimizers); `modules` (incl. EMAs) and
    `optimizers`/`schedulers` are what a checkpoint holds; `emas` are updated after each step;
    `grid(path) -> metrics` writes a PNG of the final model (and may evaluate it)."""

    name: str
    steps: int
    batch_size: int  # per rank
    log_every: int
    ckpt_every: int
    batches: Callable[[int], Iterator[Any]]  # start step -> batches
    step: Callable[[Any, int], dict[str, Tensor]]
    modules: dict[str, nn.Module]
    optimizers: dict[str, Any]
    schedulers: dict[str, Any] = field(default_factory=dict)
    emas: dict[str, EMA] = field(default_factory=dict)
    grid: Callable[[Path], dict[str, float]] | None = None


@dataclass
class Context:
    """What every stage needs from the run: config, run directory, device, distributed info."""

    cfg: Any  # fastdae.config.TrainConfig
    run_dir: Path
    device: torch.device
    dist: Dist

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.cfg.precision)

    def stage_dir(self, name: str) -> Path:
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def run_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    """batch -> step (forward, loss, backward, optimizer) -> EMA -> log -> checkpoint, from the last
    checkpoint when cfg.resume. Returns throughput and the last logged losses."""
    out = ctx.stage_dir(stage.name)
    ckpt = Checkpointer(out)
    saved = {**stage.modules, **{f"ema_{k}": e for k, e in stage.emas.items()}}
    start = 0
    latest = ckpt.latest() if ctx.cfg.resume else None
    if latest is not None:
        state = Checkpointer.load(latest, saved)
        for k, o in stage.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in stage.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        start = int(state["step"])
    log = CSVLog(out / "log.csv", start if latest is not None else None) if ctx.dist.is_main else None
    tb = _tensorboard(out) if ctx.cfg.tensorboard and ctx.dist.is_main else None

    def save(step: int) -> None:
        if ctx.dist.is_main:
            ckpt.save(step, saved, {"optimizers": {k: o.state_dict() for k, o in stage.optimizers.items()},
                                    "schedulers": {k: s.state_dict() for k, s in stage.schedulers.items()},
                                    "config": ctx.cfg.to_dict()})

    from tqdm import tqdm

    images = stage.batch_size * ctx.dist.world_size  # per step, all ranks
    bar = tqdm(total=stage.steps, initial=start, desc=stage.name, unit="step",
               disable=not (ctx.cfg.progress and ctx.dist.is_main))
    nonfinite = torch.zeros((), dtype=torch.bool, device=ctx.device)
    last: dict[str, float] = {}
    batches = stage.batches(start)
    wait = 0.0
    t0 = t_log = time.perf_counter()
    step_log = start
    for step in range(start, stage.steps):
        seed_step(ctx.cfg.seed, stage.name, step, ctx.dist.rank)
        t_wait = time.perf_counter()
        batch = to_device(next(batches), ctx.device)
        wait += time.perf_counter() - t_wait
        losses = stage.step(batch, step)
        for ema in stage.emas.values():
            ema.update(step)
        nonfinite |= ~torch.isfinite(losses["loss"].detach())
        done = step + 1
        if done % stage.log_every == 0 or done % stage.ckpt_every == 0 or done == stage.steps:
            _check_finite(nonfinite, stage.name, done, ckpt.latest(), ctx.dist)  # the only sync besides logging
            now = time.perf_counter()
            last = {k: float(v) for k, v in losses.items()}
            rate = images * (done - step_log) / max(now - t_log, 1e-9)
            t_log, step_log = now, done
            if log is not None:
                log.write({"step": done, **{k: f"{v:.6g}" for k, v in last.items()}, "images_per_s": f"{rate:.1f}",
                           "time_s": f"{now - t0:.2f}"})
            if tb is not None:
                for k, v in last.items():
                    tb.add_scalar(f"{stage.name}/{k}", v, done)
            bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{rate:.0f}")
        if done % stage.ckpt_every == 0 or done == stage.steps:
            save(done)
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    ran = stage.steps - start
    evaluation = stage.grid(out / "reconstructions.png") if stage.grid is not None and ctx.dist.is_main else {}
    if tb is not None:
        tb.close()
    return {"steps": stage.steps, "steps_this_run": ran, "time_s": elapsed,
            "images_per_s": images * ran / elapsed if ran else None,
            "loader_wait_fraction": wait / elapsed if ran else None, "final": last, "eval": evaluation}


def _check_finite(nonfinite: Tensor, stage: str, step: int, good: Path | None, d: Dist) -> None:
    flag = nonfinite.float()
    if d.world_size > 1:  # every rank must stop together, or the others hang in the next collective
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if bool(flag):
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{stage}: the loss became NaN/Inf at or before step {step}; stopped without saving ({where}). "
            f"Lower the learning rate or raise grad clipping, then resume.")


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from e
    return SummaryWriter(str(out / "tb"))
