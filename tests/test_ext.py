"""fastdae/_ext.py and csrc/cpu_dispatch.h: a killed builder never blocks the next process,
the cache key names the instruction set compiled for and the library is portable, and
every ISA path the CPU offers gives the exact nearest codes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastdae import _ext

ROOT = Path(__file__).resolve().parents[1]
HAS_VQ = _ext.available("vq")
needs_vq = pytest.mark.skipif(not HAS_VQ, reason="the C++ ops are not built (no compiler, or FASTDAE_NO_EXT=1)")
ISAS = ["generic", "avx2", "avx512", "avx512bf16", "amx"]


def python(code: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with this checkout first on the path."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True, timeout=timeout
    )


def holder(lock_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process that takes the build lock of lock_dir and sleeps holding it (prints 'held' first)."""
    code = f"""
        import time
        from pathlib import Path
        from fastdae import _ext
        with _ext.build_lock(Path({str(lock_dir)!r}), 10):
            print("held", flush=True)
            time.sleep(600)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@needs_vq
def test_a_builder_killed_while_holding_the_lock_never_blocks_the_next_process(tmp_path):
    # The cache entry as a killed build leaves it: the library, torch's baton file `lock`, and our
    # flock taken by a process that then dies by SIGKILL. Before the fix the next process waited on
    # the baton forever.
    name = _ext.entry_name("vq")
    entry = tmp_path / name
    entry.mkdir()
    shutil.copy2(_ext._cache_root() / name / f"{name}.so", entry / f"{name}.so")
    (entry / "lock").write_text("")
    env = {"FASTDAE_EXT_DIR": str(tmp_path), "FASTDAE_EXT_LOCK_TIMEOUT": "60"}
    proc = holder(entry, env)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    out = python("from fastdae import _ext; print(_ext.available('vq'), _ext.cpu_isa())", env, timeout=90)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "True", out.stderr
    assert time.monotonic() - t0 < 60  # loaded, not timed out


def test_a_live_holder_makes_a_waiter_give_up_with_a_message_naming_it(tmp_path):
    proc = holder(tmp_path, {})
    try:
        with pytest.raises(_ext.ExtLockTimeout, match=rf"held by pid {proc.pid}.*FASTDAE_EXT_LOCK_TIMEOUT"):
            with _ext.build_lock(tmp_path, timeout=0.5):
                pass
    finally:
        proc.kill()
        proc.wait()
    with _ext.build_lock(tmp_path, timeout=5):  # the OS released the dead holder's lock
        assert (tmp_path / _ext.LOCK_NAME).read_text().strip() == str(os.getpid())


def test_a_lock_timeout_falls_back_to_the_reference_with_one_warning(tmp_path):
    name = _ext.entry_name("vq")
    proc = holder(tmp_path / name, {})
    try:
        out = python(
            """
            import warnings
            warnings.simplefilter("always")
            from fastdae import _ext
            print(_ext._load_source("vq"))
            """,
            {"FASTDAE_EXT_DIR": str(tmp_path), "FASTDAE_EXT_LOCK_TIMEOUT": "0.5"},
            timeout=60,
        )
    finally:
        proc.kill()
        proc.wait()
    assert out.stdout.strip() == "False", out.stderr
    assert f"held by pid {proc.pid}" in out.stderr and "pure-torch reference" in out.stderr


def test_a_bad_lock_timeout_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTDAE_EXT_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FASTDAE_EXT_LOCK_TIMEOUT.*'soon'"):
        _ext._lock_timeout()


def test_the_cache_key_names_the_compiled_instruction_set_not_the_host_cpu():
    assert not any("native" in f for f in _ext._CFLAGS), _ext._CFLAGS
    if os.uname().machine == "x86_64":
        assert "-march=x86-64" in _ext.ISA_FLAGS
    src = _ext._source_dir() / "vq.cpp"
    key = _ext.cache_key(src)
    assert key == _ext.cache_key(src, list(_ext._CFLAGS))  # the default flags are the ones keyed
    assert key != _ext.cache_key(src, [f for f in _ext._CFLAGS if not f.startswith("-march")] + ["-march=native"])
    assert _ext.entry_name("vq") == f"fastdae_vq_{key}"


def test_the_cache_key_covers_the_shared_headers(tmp_path):
    for f in ("vq.cpp", "cpu_dispatch.h", "vq_kernel.h"):
        shutil.copy2(_ext._source_dir() / f, tmp_path / f)
    before = _ext.cache_key(tmp_path / "vq.cpp")
    (tmp_path / "cpu_dispatch.h").write_text((tmp_path / "cpu_dispatch.h").read_text() + "\n// edited\n")
    assert _ext.cache_key(tmp_path / "vq.cpp") != before


@needs_vq
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 instruction sets")
@pytest.mark.parametrize("stem", ["vq", "lpips"])
def test_the_built_library_uses_vector_extensions_only_in_dispatched_functions(stem):
    _ext.available(stem)
    name = _ext.entry_name(stem)
    lib = _ext._cache_root() / name / f"{name}.so"
    if not lib.is_file():
        pytest.skip("the C++ ops were loaded from a prebuilt fastdae._C")
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(lib)], capture_output=True, text=True)
    fn, offenders, dispatched = "", set(), 0
    for line in asm.stdout.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.*)>:$", line):
            fn = m.group(1)
        # VEX/EVEX encodings (AVX and later: mnemonics v*, ymm/zmm/opmask/tile registers, AMX t*)
        elif re.search(r"\t(v[a-z0-9]+|t(ile|dp)[a-z0-9]*)\s|%[yzt]mm|%k[0-7]", line):
            if re.search(r"\b(avx2|avx512|avx512bf16|amx)::", fn):
                dispatched += 1
            else:
                offenders.add(fn[:160])
    assert not offenders, f"AVX instructions outside the dispatched kernels: {sorted(offenders)[:5]}"
    assert dispatched > 0  # the dispatched kernels are there


def _hardware_isa() -> str:
    out = python("from fastdae import _ext; print(_ext.cpu_isa())", {"FASTDAE_CPU_ISA": ""}, timeout=120)
    return out.stdout.strip()


@needs_vq
@pytest.mark.parametrize("cap", ISAS)
def test_every_isa_path_reports_itself_and_finds_the_exact_nearest_codes(cap):
    hw = _hardware_isa()
    out = python(
        """
        import torch
        from fastdae import _ext
        from fastdae.kernels.vq import vq_nearest
        from fastdae.kernels.lpips import lpips_head, lpips_head_ref
        from tests.kernels.test_vq import near_ties, nearest_check
        torch.manual_seed(0)
        x, c, truth = near_ties(64, 2048, 64)
        idx, sqdist = vq_nearest(x, c, impl="cpp")
        nearest_check(x, c, idx, sqdist)
        assert _ext.cpu_isa() != "amx" or torch.equal(idx, truth)
        for N, K, D in [(97, 300, 24), (40, 50, 7), (64, 1000, 256), (33, 1, 8)]:
            x, c = torch.randn(N, D), torch.randn(K, D)
            idx, sqdist = vq_nearest(x, c, impl="cpp")
            nearest_check(x, c, idx, sqdist)
        f0 = [torch.randn(2, 64, 9, 9), torch.randn(2, 17, 5, 5)]
        f1 = [torch.randn_like(f) for f in f0]
        w = [torch.rand(f.shape[1]) for f in f0]
        torch.testing.assert_close(lpips_head(f0, f1, w, impl="cpp"), lpips_head_ref(f0, f1, w))
        print(_ext.cpu_isa())
        """,
        {"FASTDAE_CPU_ISA": cap},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    expected = ISAS[min(ISAS.index(cap), ISAS.index(hw))]
    assert out.stdout.strip() == expected
