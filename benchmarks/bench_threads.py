"""CPU thread settings on a quiet and on a busy machine (docs/cpu.md).

    pytest benchmarks/bench_threads.py --benchmark-only

One training step of the tiny preset's prior (`fastdae.config.preset("tiny")`: DiT-T/2 over its 4 x 8 x 8
latents; batch BATCH, the batch an earlier review measured the step at) in a worker process per setting: the
OpenMP spin must be chosen before torch loads, so every member is its own interpreter, started with
its environment and driven over a pipe (one round = one step; the pipe adds ~0.1 ms). All members'
workers live at once, and the figures to compare are `interleaved_median_ms` / `interleaved_min_ms`
in extra_info: INTERLEAVED_ROUNDS rounds of one step of every member in a shuffled order, so that on a
machine whose other load comes and goes every member sees the same load (pytest-benchmark's own
TIMED_ROUNDS rounds run one member after another).

Members (what differs is only the environment of the worker and its thread count):
  torch-default       what a run did before fastdae chose anything: libgomp's spin, torch's threads
  fastdae-default     `python -m fastdae` / `fastdae.threads.configure()` now: FASTDAE_SPIN=auto (passive
                      if the load is above the CPUs when the worker starts, else bounded), threads
                      auto, and the stall watch of a training stage (it may have dropped to one thread
                      during the warm-up steps: worker_threads in extra_info)
  passive             FASTDAE_SPIN=passive (OMP_WAIT_POLICY=PASSIVE), threads auto
  bounded             FASTDAE_SPIN=bounded (GOMP_SPINCOUNT=100000), threads auto
  one-thread          libgomp's spin, 1 thread
Groups: `threads-quiet` (nothing added; the load average beside each member is in extra_info, since
the machine may be shared) and `threads-busy` (BUSY Python processes spinning at the same priority,
started by the fixture, killed at its end, and ending by themselves after BUSY_LIMIT_S if the run dies). The goal:
fastdae-default within 1.5x of the best member of each group, and not slower than torch-default quiet.
Run it on a quiet machine for the quiet figures; a shared machine's load shows up in `loadavg`.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

if __name__ != "__main__":  # not in the worker: benchmarks/conftest.py imports torch, which must load after the spin
    from conftest import HAS_CUDA  # benchmarks/conftest.py (pytest puts its folder on sys.path)

    pytestmark = pytest.mark.skipif(HAS_CUDA, reason="CPU threads: a CPU benchmark (gpu_check.sh skips it)")

BATCH = 64
BUSY = 2
BUSY_LIMIT_S = 1200  # the busy processes end by themselves after this, whatever happens to pytest
INTERLEAVED_ROUNDS = 12  # the figures to compare: every member's steps interleaved
TIMED_ROUNDS = 3  # pytest-benchmark's own rounds per member, one member after another
# steps before the timed rounds, for every member: the stall watch's warm-up, reference and probe
WARMUP_STEPS = 24
ROOT = Path(__file__).resolve().parents[1]
OMP_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "FASTDAE_SPIN", "MKL_NUM_THREADS")
# member -> (FASTDAE_SPIN, threads): threads 0 = auto
MEMBERS: dict[str, tuple[str, int]] = {
    "torch-default": ("libgomp", 0),
    "fastdae-default": ("auto", 0),
    "passive": ("passive", 0),
    "bounded": ("bounded", 0),
    "one-thread": ("libgomp", 1),
}


# ---- the worker (python bench_threads.py --worker SPIN THREADS) ----------------------------------
def worker(spin: str, threads: int) -> None:
    """Configure the threads before torch loads, build the tiny preset's prior step, then run one
    step per 'step' line on stdin and answer 'ok <threads>' (after WARMUP_STEPS steps, 'ready' first). The
    fastdae-default member (FASTDAE_SPIN=auto, threads auto) ticks a StallWatch after every step,
    as a training stage does (fastdae/training/logs.py)."""
    os.environ["FASTDAE_SPIN"] = spin
    from fastdae import threads as fthreads

    fthreads.configure(threads or "auto")
    import torch

    from fastdae.config import preset
    from fastdae.models.diffusion import make_diffusion
    from fastdae.models.dit import DiT_models

    cfg = preset("tiny")
    size = cfg.data.size // 2 ** (len(cfg.autoencoder.ch_mult) - 1)  # the latents' side
    torch.manual_seed(0)
    model = DiT_models[cfg.prior.model](
        input_size=size, in_channels=cfg.autoencoder.z_channels, num_classes=0, learn_sigma=False
    )
    diffusion = make_diffusion(cfg.prior.objective, cfg.prior.schedule, cfg.prior.num_timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.prior.lr)
    x0 = torch.randn(BATCH, cfg.autoencoder.z_channels, size, size)

    def step() -> None:
        loss = diffusion.loss(model, x0, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    watch = fthreads.StallWatch("bench", enabled=spin == "auto" and threads == 0)
    for _ in range(WARMUP_STEPS):
        step()
        watch.tick()
    print(f"ready {torch.get_num_threads()} {fthreads.spin_in_effect()}", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        step()
        watch.tick()
        print(f"ok {torch.get_num_threads()}", flush=True)


# ---- the pytest side -------------------------------------------------------------------------
def _clean_env(spin: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["FASTDAE_SPIN"] = spin
    return env


class Worker:
    def __init__(self, spin: str, threads: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", spin, str(threads)],
            env=_clean_env(spin),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._read().split()
        assert ready[0] == "ready", ready
        self.threads, self.spin = int(ready[1]), ready[2]

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker died (status {self.proc.wait()})")
        return line

    def step(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        self.threads = int(self._read().split()[1])  # the count now: the stall watch may change it

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _busy_process() -> subprocess.Popen:
    """One process spinning on a core at normal priority that ends by itself after BUSY_LIMIT_S (so a
    killed pytest leaves nothing behind for long); the fixture kills it directly (no wrapper process
    whose death would orphan it)."""
    code = f"import time\nend = time.monotonic() + {BUSY_LIMIT_S}\nwhile time.monotonic() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module", params=["quiet", "busy"])
def condition(request) -> Iterator[str]:
    """'busy': BUSY spinning processes beside the module's busy tests, killed at the end."""
    if request.param == "quiet":
        yield "quiet"
        return
    procs = [_busy_process() for _ in range(BUSY)]
    time.sleep(2.0)  # let the scheduler see them
    try:
        yield "busy"
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def measured(condition) -> Iterator[dict]:
    """Every member's worker (started one after another, each warming up alone), then
    INTERLEAVED_ROUNDS rounds that time one step of every member in a shuffled order: on a machine
    whose other load comes and goes, these are the figures to compare (each member sees the same load)."""
    workers: dict[str, Worker] = {}
    try:
        for member, (spin, threads) in MEMBERS.items():
            workers[member] = Worker(spin, threads)
        times: dict[str, list[float]] = {m: [] for m in MEMBERS}
        loads, order, rng = [], list(MEMBERS), random.Random(0)
        for _ in range(INTERLEAVED_ROUNDS):
            rng.shuffle(order)
            for member in order:
                t0 = time.perf_counter()
                workers[member].step()
                times[member].append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
        yield {"workers": workers, "times": times, "loads": loads}
    finally:
        for w in workers.values():
            w.close()


@pytest.mark.parametrize("member", list(MEMBERS))
def test_thread_settings(benchmark, record, condition, measured, member):
    benchmark.group = f"threads-{condition}"
    w, times = measured["workers"][member], measured["times"][member]
    benchmark.pedantic(w.step, rounds=TIMED_ROUNDS, iterations=1)
    record(
        member=member,
        condition=condition,
        busy_processes=BUSY if condition == "busy" else 0,
        worker_threads_at_end=w.threads,
        worker_spin=w.spin,
        batch=BATCH,
        interleaved_median_ms=1e3 * statistics.median(times),
        interleaved_min_ms=1e3 * min(times),
        interleaved_rounds=len(times),
        loadavg_1min_during=[min(measured["loads"]), max(measured["loads"])],
        cpus=len(os.sched_getaffinity(0)),
    )


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    worker(sys.argv[2], int(sys.argv[3]))
