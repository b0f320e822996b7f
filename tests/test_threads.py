"""fastdae/threads.py: the `threads` setting, the spin chosen before torch loads (`python -m fastdae`,
`configure`), and the stall watch that drops to one thread on a machine that got busy."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastdae import threads
from fastdae.config import ConfigError, TrainConfig, apply_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def torch_threads():
    """Restores torch's thread count and the module's drop record after a test that changes them."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    threads._dropped_to = None


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "FASTDAE_SPIN")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_auto_threads_follow_omp_num_threads_else_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve_threads("auto") == 3 and threads.resolve_threads(0) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert threads.available_cpus() == 3
    assert threads.resolve_threads("auto") == 3
    assert threads.resolve_threads(2) == 2


@pytest.mark.parametrize("bad", [-1, "two", 1.5, True])
def test_a_bad_thread_count_names_the_setting(bad):
    with pytest.raises(ValueError, match=r"threads must be 'auto', 0 \(auto\) or an int >= 1"):
        threads.resolve_threads(bad)


def test_the_threads_config_key_defaults_to_auto_and_rejects_negatives():
    assert TrainConfig().threads == 0
    assert apply_overrides(TrainConfig(), ["threads=1"]).threads == 1
    with pytest.raises(ConfigError, match="threads"):
        apply_overrides(TrainConfig(), ["threads=-2"])


def test_the_default_spin_is_bounded_on_free_cores_passive_on_busy_ones_and_a_users_own_variables_win(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    env: dict[str, str] = {}
    assert threads.prepare_env(env, load=1.5) == "bounded" and env == {"GOMP_SPINCOUNT": "100000"}
    env = {}
    assert threads.prepare_env(env, load=3.0) == "passive" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"FASTDAE_SPIN": "passive"}
    assert threads.prepare_env(env, load=0.0) == "passive" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"FASTDAE_SPIN": "bounded"}
    assert threads.prepare_env(env, load=9.0) == "bounded" and env["GOMP_SPINCOUNT"] == "100000"
    env = {"FASTDAE_SPIN": "libgomp"}
    assert threads.prepare_env(env) == "libgomp" and set(env) == {"FASTDAE_SPIN"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.prepare_env(env) == "user" and env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_a_bad_spin_setting_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match="FASTDAE_SPIN must be one of auto, bounded, passive, libgomp; got 'fast'"):
        threads.prepare_env({"FASTDAE_SPIN": "fast"})


def test_importing_the_module_does_not_load_torch():
    out = run_python("import sys, fastdae.threads; print('torch' in sys.modules)", {})
    assert out.stdout.strip() == "False", out.stderr


def test_python_m_fastdae_sets_the_spin_before_torch_loads():
    out = run_python(
        """
        import os, runpy, sys
        import fastdae.threads as t
        seen = {}
        prepare = t.prepare_env
        def spy(environ=None):
            seen["torch_loaded"] = "torch" in sys.modules
            return prepare(environ)
        t.prepare_env = spy
        sys.argv = ["fastdae", "--help"]
        try:
            runpy.run_module("fastdae", run_name="__main__")
        except SystemExit:
            pass
        print(seen["torch_loaded"], os.environ.get("GOMP_SPINCOUNT"))
        """,
        {"FASTDAE_SPIN": "bounded"},
    )
    assert out.stdout.strip().splitlines()[-1] == "False 100000", out.stderr


def test_python_m_fastdae_with_a_bad_spin_prints_one_line_and_exits_2():
    out = subprocess.run(
        [sys.executable, "-m", "fastdae", "--help"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "FASTDAE_SPIN": "fast"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "fastdae: FASTDAE_SPIN must be one of auto, bounded, passive, libgomp; got 'fast'"
    ]


def test_configure_before_torch_sets_spin_and_threads_after_torch_only_threads():
    out = run_python(
        """
        import os, fastdae.threads as t
        s = t.configure(1)
        import torch
        print(s.spin, s.threads, torch.get_num_threads(), os.environ.get("GOMP_SPINCOUNT"))
        """,
        {"FASTDAE_SPIN": "bounded"},
    )
    assert out.stdout.split() == ["bounded", "1", "1", "100000"], out.stderr
    out = run_python("import torch, fastdae.threads as t; s = t.configure(1); print(s.spin, s.threads)", {})
    assert out.stdout.split() == ["fixed", "1"], out.stderr


class FakeClock:
    """perf_counter and getloadavg for a StallWatch: each tick's step takes `step_s()` seconds."""

    def __init__(self, monkeypatch, load: float) -> None:
        self.now, self.load = 0.0, load
        monkeypatch.setattr(threads.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (self.load, self.load, self.load))
        monkeypatch.setattr(threads, "available_cpus", lambda: 2)

    def run(self, watch: threads.StallWatch, steps: int, step_s) -> list[str]:
        notices = []
        for _ in range(steps):
            self.now += step_s(torch.get_num_threads())
            if (n := watch.tick()) is not None:
                notices.append(n)
        return notices


def test_a_busy_machine_at_the_start_keeps_one_thread_when_it_measures_faster(torch_threads, monkeypatch, caplog):
    clock = FakeClock(monkeypatch, load=9.0)
    torch.set_num_threads(2)
    w = threads.StallWatch("prior")
    with caplog.at_level("WARNING", logger="fastdae"):
        notices = clock.run(w, 40, lambda n: 0.9 if n > 1 else 0.2)
    assert len(notices) == 1 and "900 ms on 2 threads, 200 ms on 1: continuing on 1 thread" in notices[0]
    assert caplog.messages == notices and "load 9.0 on 2 CPUs" in notices[0]
    assert torch.get_num_threads() == 1
    assert threads.apply_threads(0) == 1  # later stages of an auto run stay on one thread
    assert threads.apply_threads(2) == 2  # an explicit count is the user's


def test_a_probe_that_measures_one_thread_slower_goes_back_silently(torch_threads, monkeypatch):
    clock = FakeClock(monkeypatch, load=4.0)
    torch.set_num_threads(2)
    w = threads.StallWatch("prior")
    assert clock.run(w, 40, lambda n: 0.1 if n > 1 else 0.25) == []
    assert torch.get_num_threads() == 2 and w.probes == 1


def test_a_quiet_machine_is_never_probed(torch_threads, monkeypatch):
    clock = FakeClock(monkeypatch, load=0.5)
    torch.set_num_threads(2)
    w = threads.StallWatch("prior")
    assert clock.run(w, 100, lambda n: 0.05 if clock.now < 2 else 1.0) == []  # slow, but nothing else runs
    assert torch.get_num_threads() == 2 and w.probes == 0


def test_steps_that_get_far_slower_under_load_later_start_a_probe(torch_threads, monkeypatch):
    clock = FakeClock(monkeypatch, load=0.5)
    torch.set_num_threads(2)
    w = threads.StallWatch("stage1")
    assert clock.run(w, 30, lambda n: 0.05) == []
    assert w.reference == pytest.approx(0.05)
    clock.load = 6.0
    assert clock.run(w, threads.STALL_WINDOW, lambda n: 0.12) == []  # 2.4x: not a stall
    assert w.probes == 0
    notices = clock.run(w, 30, lambda n: 0.5 if n > 1 else 0.1)
    assert len(notices) == 1 and torch.get_num_threads() == 1


def test_an_explicit_thread_count_or_a_disabled_watch_is_never_changed(torch_threads, monkeypatch):
    clock = FakeClock(monkeypatch, load=9.0)
    torch.set_num_threads(2)
    for w in (threads.StallWatch("prior", may_drop=False), threads.StallWatch("prior", enabled=False)):
        assert clock.run(w, 60, lambda n: 0.9 if n > 1 else 0.1) == []
        assert torch.get_num_threads() == 2 and w.probes == 0


def test_probes_per_stage_are_bounded(torch_threads, monkeypatch):
    clock = FakeClock(monkeypatch, load=9.0)
    torch.set_num_threads(2)
    w = threads.StallWatch("prior")
    clock.run(w, 20, lambda n: 0.05)  # a fast reference
    clock.run(w, 400, lambda n: 0.5)  # then slow whatever the count: probes never pay
    assert w.probes == threads.MAX_PROBES and torch.get_num_threads() == 2
