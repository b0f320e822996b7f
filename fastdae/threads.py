"""CPU threads on a machine that other work shares (docs/cpu.md has the figures).

torch's CPU ops run on OpenMP (libgomp) threads, which spin at every barrier before they sleep. On
an idle machine the spin is what makes a step fast; when other processes hold the cores, a thread
spins while the partner it waits for is descheduled, and a step gets several times slower. Two
knobs matter, and they are set at different times:
  * the spin (`FASTDAE_SPIN`; auto: passive when the load is above the CPUs at start-up, else a
    bounded spin): libgomp reads it once, when it starts, i.e. at `import torch`. So
    `python -m fastdae` chooses it first thing (`prepare_env`), and a Python-API user calls
    `fastdae.threads.configure()` before importing torch (after, only the thread count can change);
  * the thread count (config key `threads`, `torch.set_num_threads`): any time.
`StallWatch` then watches a CPU run's step times: when the load average is above the CPUs this
process may use at the start, or later when steps get far slower than the first ones, it times a few
steps on one thread and keeps whichever count measured faster, saying so in one line if it drops.

This module does not import torch at module level: `prepare_env` must run before torch loads.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("fastdae")

SPIN_ENV = "FASTDAE_SPIN"
# FASTDAE_SPIN value -> the libgomp variables it sets (only where the user set neither of them).
# "bounded": spin at most ~100k iterations, then sleep: as fast as the default spin when the cores
# are free (measured earlier: 53 vs 52 ms), and it stops burning the time slice of a descheduled partner.
# "passive": sleep at once: the fastest on a busy machine, slower on a quiet one (benchmarks/bench_threads.py).
SPIN_SETTINGS: dict[str, dict[str, str]] = {
    "bounded": {"GOMP_SPINCOUNT": "100000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "libgomp": {},  # libgomp's own default (spin long): what torch does without fastdae
}
DEFAULT_SPIN = "bounded"  # FASTDAE_SPIN=auto on a machine whose load is within its CPUs
_OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

STALL_WARMUP = 3  # steps skipped before the reference steps (allocator, caches, first-touch)
STALL_REFERENCE = 10  # steps whose median is the run's reference step time
STALL_WINDOW = 10  # the latest steps compared with it
STALL_FACTOR = 3.0  # "far slower"
PROBE_STEPS = 6  # steps on one thread in a probe
PROBE_MARGIN = 0.8  # one thread is kept when its median step is below this fraction of the steps before
MAX_PROBES = 3  # per stage
_dropped_to: int | None = None  # the thread count a StallWatch of this process dropped to


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's cpuset), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | str) -> int:
    """The thread count a `threads` setting means: an int >= 1 as given; "auto" or 0 (the config key's
    default): OMP_NUM_THREADS when the user set it, else the CPUs this process may use."""
    if threads == "auto" or (type(threads) is int and threads == 0):
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env.isdigit() and int(env) >= 1:
            return int(env)
        return available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be 'auto', 0 (auto) or an int >= 1, got {threads!r}")
    return threads


def spin_setting(environ: os._Environ[str] | dict[str, str] | None = None, load: float | None = None) -> str:
    """The FASTDAE_SPIN setting. "auto" (the default): "passive" when the 1-minute load average
    (`load`, default os.getloadavg) is above the CPUs this process may use (other work holds the
    cores at start-up: a sleeping wait measured fastest there), else "bounded" (as fast as libgomp's
    long spin on free cores). ValueError names the variable and the choices."""
    env = os.environ if environ is None else environ
    value = env.get(SPIN_ENV, "auto").strip().lower() or "auto"
    if value == "auto":
        if load is None:
            try:
                load = os.getloadavg()[0]
            except (AttributeError, OSError):  # not Unix
                load = 0.0
        return "passive" if load > available_cpus() else DEFAULT_SPIN
    if value not in SPIN_SETTINGS:
        raise ValueError(f"{SPIN_ENV} must be one of auto, {', '.join(SPIN_SETTINGS)}; got {value!r}")
    return value


def prepare_env(environ: os._Environ[str] | dict[str, str] | None = None, load: float | None = None) -> str:
    """Set the OpenMP spin for FASTDAE_SPIN in `environ` (default os.environ), before torch loads.
    A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins (nothing is set then). Returns what governs
    the spin: the setting's name, or "user" (the user's variables), or "fixed" (torch already loaded)."""
    env = os.environ if environ is None else environ
    setting = spin_setting(env, load)
    if environ is None and "torch" in sys.modules:
        return "fixed"
    if any(v in env for v in _OMP_VARS):
        return "user"
    env.update(SPIN_SETTINGS[setting])
    return setting


def spin_in_effect() -> str:
    """How this process's OpenMP threads wait: "passive", "bounded" (a GOMP_SPINCOUNT <= 1e6) or "spin"."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return "passive"
    count = os.environ.get("GOMP_SPINCOUNT", "").strip()
    if count.isdigit() and int(count) <= 1_000_000:
        return "bounded"
    return "spin"


@dataclass
class Settings:
    """What `configure` did: the thread count, and what governs the spin (see prepare_env)."""

    threads: int
    spin: str


def configure(threads: int | str = "auto") -> Settings:
    """The Python-API helper: call it before `import torch` to get what `python -m fastdae` does
    (the FASTDAE_SPIN spin, then `threads` torch threads). Called after torch loaded, it sets the
    thread count and logs that the spin is fixed for this process (set FASTDAE_SPIN or
    GOMP_SPINCOUNT in the environment, or call this first)."""
    spin = prepare_env()
    if spin == "fixed":
        log.info(
            "fastdae.threads.configure: torch was imported first, so the OpenMP spin is %s for this process; "
            "call configure() before importing torch to choose it",
            spin_in_effect(),
        )
    n = resolve_threads(threads)
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return Settings(threads=n, spin=spin)


def apply_threads(threads: int | str) -> int:
    """torch.set_num_threads for a `threads` config value (no call when it already holds); the count.
    "auto" stays at one thread once a StallWatch of this process dropped to it."""
    import torch

    n = resolve_threads(threads)
    if _dropped_to is not None and (threads == "auto" or threads == 0):
        n = min(n, _dropped_to)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


class StallWatch:
    """Step times of one CPU stage, and the thread count they favour. `tick()` after every step.

    After STALL_WARMUP steps it takes the median of STALL_REFERENCE steps as the reference. Then, and
    whenever the median of the latest STALL_WINDOW steps is STALL_FACTOR x the reference, if the
    1-minute load average is above the CPUs this process may use (other work holds the cores) and
    more than one thread runs, it probes: PROBE_STEPS steps on one thread, and keeps one thread when
    their median beats the steps before by PROBE_MARGIN, else goes back. The measurement decides
    (with a bounded spin and a moderately busy machine two threads stay ahead; on a crowded one, or
    with libgomp's long spin, one thread wins: benchmarks/bench_threads.py, docs/cpu.md). A drop is
    logged in one line and returned by the tick that decides it; an auto run's later stages then stay
    on one thread (apply_threads). Only with `may_drop` (the threads key is auto), at most
    MAX_PROBES times per stage."""

    def __init__(self, stage: str, enabled: bool = True, may_drop: bool = True) -> None:
        self.stage, self.enabled, self.may_drop = stage, enabled, may_drop
        self.times: list[float] = []
        self.last = time.perf_counter()
        self.reference: float | None = None
        self.probing_from: int | None = None  # the thread count a probe returns to
        self.before: float = 0.0  # the median step time the probe competes with
        self.probes = 0
        self.load = 0.0

    def tick(self) -> str | None:
        if not (self.enabled and self.may_drop):
            return None  # nothing to decide: keep no step times (a GPU run's list would grow every step)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        n = len(self.times)
        if self.probing_from is not None:
            return self._finish_probe() if n >= PROBE_STEPS else None
        if self.reference is None:
            if n < STALL_WARMUP + STALL_REFERENCE:
                return None
            self.reference = statistics.median(self.times[STALL_WARMUP:])
            self.times = []
            self._maybe_probe(self.reference, os.getloadavg()[0])
            return None
        if n < STALL_WINDOW:
            return None
        recent = statistics.median(self.times[-STALL_WINDOW:])
        self.times = []
        if recent >= STALL_FACTOR * self.reference:
            self._maybe_probe(recent, os.getloadavg()[0])
        return None

    def _maybe_probe(self, before: float, load: float) -> bool:
        """Start a probe on one thread when the machine is busy and more threads run; True if it did."""
        import torch

        threads = torch.get_num_threads()
        if load <= available_cpus() or threads <= 1 or self.probes >= MAX_PROBES:
            return False
        self.probes += 1
        self.probing_from, self.before, self.load = threads, before, load
        self.times = []
        torch.set_num_threads(1)
        return True

    def _finish_probe(self) -> str | None:
        import torch

        one = statistics.median(self.times)
        self.times = []
        back, before = self.probing_from, self.before
        assert back is not None
        self.probing_from = None
        if one < PROBE_MARGIN * before:
            global _dropped_to
            _dropped_to = 1
            self.reference = one
            notice = (
                f"{self.stage}: the machine is busy (load {self.load:.1f} on {available_cpus()} CPUs) and a step takes "
                f"{before * 1e3:.0f} ms on {back} threads, {one * 1e3:.0f} ms on 1: continuing on 1 thread "
                "(set threads: N to choose; docs/cpu.md)"
            )
            log.warning(notice)
            return notice
        torch.set_num_threads(back)
        return None
