"""Processes, devices and the order of data, shared by every stage.

Exact resume rests on two rules: (1) the batch of global step s is a function of (seed, s) only
(`StepBatchSampler`, `LatentCache.loader(...).set_epoch`), and (2) the torch RNG is re-seeded at
the start of every step from (seed, stage, step, rank) (`seed_step`), so dropout, KL noise and
diffusion noise do not depend on how many steps ran in this process. Everything else that evolves
(weights, optimizer and scheduler state, EMA, BatchNorm buffers) is in the checkpoint.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from fastdae.data import MapDataset

T = TypeVar("T")

# what Dist.agree tells a user whose ranks read different datasets
SAME_DATA = (
    "every node must read the same dataset with the same data.* settings: one folder on shared storage "
    "(docs/multi-node.md); a copy per node has other inodes and ctimes, hence another fingerprint"
)


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

    def from_main(self, value: T) -> T:
        """Rank 0's `value`, on every rank (it is returned as it is without torchrun)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, what: str, value: str, hint: str) -> None:
        """Raise RuntimeError on every rank unless all ranks hold the same `value` (e.g. the dataset's
        fingerprint). Over several machines a rank that silently trained on other data, or wrote cache
        shards under another identity, would only fail later and far from the cause; `hint` says what
        to fix. Each rank's host is named, since the usual cause is one node's own copy of a folder."""
        if self.world_size == 1:
            return
        seen: list[Any] = [None] * self.world_size
        dist.all_gather_object(seen, (socket.gethostname(), value))
        if any(v != seen[0][1] for _, v in seen):
            ranks = ", ".join(f"rank {r} on {host}: {v[:16]}" for r, (host, v) in enumerate(seen))
            raise RuntimeError(f"the ranks disagree on the {what} ({ranks}); {hint}")


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
        # fastdae made the group, so it takes it down: a group left to the interpreter's teardown can
        # abort a rank ("terminate called without an active exception") when another rank exits first
        atexit.register(_destroy_process_group)
    return Dist(rank, world, local), dev


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, d: Dist, device: torch.device, compile: bool = False) -> nn.Module:
    """The handle a stage trains through: `module` itself, wrapped in DDP under torchrun, and
    torch.compile'd when `compile` (the stage's option). It shares `module`'s parameters; checkpoints
    and EMAs read `module`."""
    if d.world_size > 1:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    if not compile:
        return module
    # the GAN's adaptive weight differentiates the compiled graph twice (autograd.grad with
    # retain_graph, then backward): compiled backwards must not donate (free) their saved buffers
    torch._functorch.config.donated_buffer = False
    return torch.compile(module)  # type: ignore[return-value]  # typed as a callable; a module's is an nn.Module


def unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def seed_step(seed: int, stage: str, step: int, rank: int) -> None:
    """Re-seed torch's RNGs (CPU and CUDA) from (seed, stage, step, rank): see the module docstring."""
    digest = hashlib.blake2b(f"{seed}/{stage}/{step}/{rank}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class StepBatchSampler(Sampler[list[int]]):
    """Index batches for steps start_step, start_step + 1, ... (endless). Step s is batch s % E of
    epoch s // E (E = batches per epoch), epoch e is `np.random.default_rng([seed, e]).permutation(n)`
    and rank r takes every world_size-th index: the same convention as the latent cache's loader."""

    def __init__(
        self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size
        self.per_epoch = (n // world_size) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"a dataset of {n} items over {world_size} rank(s) gives no full batch of {batch_size}")

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, first = divmod(step, self.per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            mine = order[: self.per_epoch * self.batch_size * self.world_size][self.rank :: self.world_size]
            for b in range(first, self.per_epoch):
                yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()
                step += 1


def image_batches(
    dataset: MapDataset, batch_size: int, seed: int, start_step: int, d: Dist, num_workers: int, device: torch.device
) -> Iterator[Any]:
    """Endless (images, labels) batches of `batch_size` per rank from global step `start_step`."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, d.rank, d.world_size)
    return iter(
        DataLoader(
            dataset,  # type: ignore[arg-type]  # typed as torch's Dataset class; it takes any map-style dataset
            batch_sampler=sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )
    )


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
