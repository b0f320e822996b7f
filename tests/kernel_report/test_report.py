"""The static kernel report as a CI gate (CPU only, no GPU): every shipped config family compiled for
sm_90 and for sm_80, at the configs the launchers pick on that GPU, must have no spills, no 8/16-bit
scalar global loads (and mostly 128-bit / cp.async / TMA ones) in its main loop, narrow loads only
for the fp32 vectors a loop reads (lse, Delta), tensor-core dots for bf16/fp16, and its default
config must be the model's best. Also the pieces the report stands on: the SASS reader (on a TMA
kernel whose loop is known), the load classifier and the launchers' alignment check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdae.kernel_report.model import violations
from fastdae.kernel_report.sass import _load_kind, _read_sass
from fastdae.kernels._launch import align_elems, strides

ROOT = Path(__file__).resolve().parents[2]  # the repository root


@pytest.fixture(scope="module")
def ci_rows(tmp_path_factory) -> list[dict]:
    """Rows of `python -m fastdae.kernel_report --ci` for sm_90 and sm_80, compiled in a subprocess:
    the report needs the real kernels, and this process runs them interpreted (TRITON_INTERPRET=1)."""
    out = tmp_path_factory.mktemp("kernel-report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    subprocess.run(
        [sys.executable, "-m", "fastdae.kernel_report", "--ci", "--targets", "sm90,sm80", "--out", str(out)],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=1200,
    )
    (path,) = out.glob("kernel-report-sm90-sm80-*.json")
    return json.loads(path.read_text())["rows"]


@pytest.mark.parametrize("target", ["sm90", "sm80"])
def test_ci_set_covers_every_config_family(ci_rows, target):
    rows = [r for r in ci_rows if r["target"] == target]
    seen = {(r["family"], r["dtype"]) for r in rows}
    for dtype in ("bf16", "fp32"):
        assert ("vector_quantize", dtype) in seen
    for family in ("attention_fwd", "attention_bwd_delta", "attention_bwd_dkdv", "attention_bwd_dq"):
        assert (family, "bf16") in seen, family
    assert ("lpips_fwd", "bf16") in seen and ("lpips_bwd", "bf16") in seen
    shapes = {r["shape"] for r in rows}
    for shape in ("D64 contiguous", "D72 fused-qkv", "D128 contiguous"):  # one per head-width family
        assert any(s.endswith(shape) for s in shapes), shape
    assert {s.split()[-1] for s in shapes if s.startswith("N65536")} == {"D8", "D32", "D256"}


@pytest.mark.parametrize("target", ["sm90", "sm80"])
def test_every_shipped_config_meets_the_rules(ci_rows, target):
    broken = [
        f"{r['family']} {r['shape']} {r['dtype']} [{r['config']}]: {'; '.join(v)}"
        for r in ci_rows
        if r["target"] == target and r["shipped"] and (v := violations(r["static"], r["dtype"], r["narrow_ok"]))
    ]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("target", ["sm90", "sm80"])
def test_each_default_config_is_the_models_best(ci_rows, target):
    """The first candidate (the interpreter's, and the launch before autotuning has run) is the one
    the model estimates fastest for the shape on that GPU (ties within 1%)."""
    groups: dict[tuple, list[dict]] = {}
    for r in ci_rows:
        if r["target"] == target and r["shipped"]:
            groups.setdefault((r["family"], r["shape"], r["dtype"]), []).append(r)

    def est(r: dict) -> float:
        e = next(iter(r["estimates"].values()))["est_us"]
        return float("inf") if e is None else e

    slow = [
        f"{key}: default [{default['config']}] {est(default):.1f} us, best [{best['config']}] {est(best):.1f} us"
        for key, rows in groups.items()
        for default, best in [(next(r for r in rows if r["default"]), min(rows, key=est))]
        if est(default) > 1.01 * est(best)
    ]
    assert not slow, "\n".join(slow)


def test_auto_routes_only_kernel_friendly_attention_to_triton(monkeypatch):
    """fp32 attention goes to SDPA (impl="triton" refuses it on a GPU), and head dims the kernel
    does not take too. As the report sees it: compiled kernels, no interpreter."""
    from fastdae.kernels import attention as A
    from fastdae.kernels.attention import auto_uses_kernel, kernel_unsupported

    monkeypatch.setattr(A, "triton_interpret", lambda: False)

    def q(D: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(2, 4, 64, D, dtype=dtype, device="meta")

    assert auto_uses_kernel(q(72, torch.bfloat16)) and auto_uses_kernel(q(128, torch.float16))
    assert not auto_uses_kernel(q(72, torch.float32)) and "sdpa" in kernel_unsupported(q(72, torch.float32))
    assert not auto_uses_kernel(q(12, torch.bfloat16)) and not auto_uses_kernel(q(136, torch.bfloat16))


def test_violations_flag_each_rule():
    clean = dict(
        spill_stores=0,
        spill_loads=0,
        loop_loads={"ldgsts_b128": 4, "b64": 1},
        mma={"HGMMA.64x64x16.F32.BF16": 8},
        dot="HGMMA.F32.BF16",
    )
    assert violations(clean, "bf16") == []
    assert "spills" in violations({**clean, "spill_stores": 8}, "bf16")[0]
    assert "scalar" in violations({**clean, "loop_loads": {"b128": 4, "b16": 2}}, "bf16")[0]
    assert "not loaded wide" in violations({**clean, "loop_loads": {"b128": 1, "b32": 2}}, "fp32")[0]
    assert "not loaded wide" in violations({**clean, "loop_loads": {"b64": 8}}, "fp32")[0]
    assert violations({**clean, "loop_loads": {"ldgsts_b128": 2, "ldgsts_b32": 2}}, "bf16", narrow_ok=2) == []
    # narrow loads beyond the loop's fp32 vectors: an operand chunk loaded narrow (D = 72's 64-79)
    assert "32-bit loads" in violations({**clean, "loop_loads": {"ldgsts_b128": 2, "ldgsts_b32": 4}}, "bf16", 2)[0]
    assert violations({**clean, "loop_loads": {"ldgsts_b128": 4, "ldgsts_b64": 2}}, "bf16") == []  # 64-bit chunk
    assert violations({**clean, "mma": {}, "dot": "-", "loop_loads": {"b128": 8, "b32": 4}}, "bf16") == []  # no MMA
    assert "tensor cores" in violations({**clean, "mma": {}, "dot": "FFMA (no tensor cores)"}, "bf16")[0]
    assert violations({**clean, "mma": {}, "dot": "FFMA (no tensor cores)"}, "fp32") == []


def test_sass_reader_finds_the_main_loop():
    sass = "\n".join(
        [
            "Function:k",
            "--:-:-:-:1\tLDG.E.U16 R2, desc[UR4][R2.64];",
            "LBB0:",
            "--:-:-:-:1\tLDGSTS.E.BYPASS.128 [R5], desc[UR6][R8.64];",
            "LBB2:",
            "--:-:-:-:1\tHGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24;",
            "--:-:-:-:1\t@P0 BRA LBB0;",
            "--:-:-:-:1\tEXIT;",
            "LBB3:",  # an mbarrier retry stub after EXIT: a spin, then a jump back into the loop
            "--:-:-:-:1\tSYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x2000], R36;",
            "--:-:-:-:1\t@!P0 BRA LBB3;",
            "--:-:-:-:1\tBRA LBB2;",
            "LBB1:",
            "--:-:-:-:1\tBRA LBB1;",  # the trap self-loop after EXIT is not a loop
        ]
    )
    info = _read_sass(sass)
    lo, hi = info["main"]
    assert info["has_loop"] and info["instrs"][lo:hi] == [
        "LDGSTS.E.BYPASS.128 [R5], desc[UR6][R8.64]",
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24",
        "BRA LBB0",
    ]


def test_sass_reader_follows_address_branches():
    """sm_100's SASS branches to addresses (16 bytes per instruction) rather than labels."""
    sass = "\n".join(
        [
            "Function:k",
            "--:-:-:-:1\tMOV R1, R2;",  # 0x00
            "--:-:-:-:1\tUTMALDG.4D [UR8], [UR10];",  # 0x10: the loop starts here
            "--:-:-:-:1\tUTCHMMA gdesc[UR8], gdesc[UR10], tmem[UR15], tmem[UR26], idesc[UR27], !UPT;",
            "--:-:-:-:5\tBRA.U !UP1, 0x10;",  # 0x30: back to 0x10
            "--:-:-:-:1\tEXIT;",
        ]
    )
    info = _read_sass(sass)
    assert info["has_loop"] and info["main"] == (1, 4)


def test_sass_reader_on_a_tma_kernel_with_a_known_loop():
    """A kernel whose loop issues one TMA load and one mbarrier wait per trip and stores after it
    (tests/kernel_report/tma_loop_kernel.py, compiled for sm_90): the reader's main loop is that
    loop, although ptxas put retry stubs after EXIT that branch back into it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("tma_loop_kernel.py")
    proc = subprocess.run([sys.executable, str(script)], check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["branches_after_exit"] >= 1  # the case the reader must not take for a loop
    assert found["has_loop"] and found["loop_exit"] == 0 and found["loop_stores"] == 0
    assert found["loop_tma"] == 1 and found["loop_waits"] == 1
    assert found["loop_len"] < found["total"] / 2


@pytest.mark.parametrize(
    "opcode, kind",
    [
        ("LDG.E.U16", "b16"),
        ("LDG.E", "b32"),
        ("LDG.E.64.CONSTANT", "b64"),
        ("LDG.E.128", "b128"),
        ("LDGSTS.E.BYPASS.LTC128B.128", "ldgsts_b128"),
        ("LDGSTS.E", "ldgsts_b32"),
        ("UTMALDG.2D", "tma"),
        ("LDS.128", None),
        ("LDGDEPBAR", None),
        ("STG.E.128", None),
    ],
)
def test_load_kinds(opcode, kind):
    assert _load_kind(opcode) == kind


def test_align_elems():
    B, N, H, D = 2, 5, 3, 72
    qkv = torch.empty(B, N, 3, H, D, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # DiT's fused-qkv views: strides 72 / 3*H*72
    assert align_elems(q, k, v) == 8
    assert align_elems(torch.empty(B, H, N, D)) == 4  # fp32: 16 bytes = 4 elements
    assert align_elems(torch.empty(B, H, N, 7, dtype=torch.bfloat16)) == 1  # rows of 14 bytes
    assert align_elems(torch.empty(B, H, N, D, dtype=torch.bfloat16)[..., 1:]) == 1  # base off by 2 bytes
    assert align_elems(torch.empty(B, H, D, N, dtype=torch.bfloat16).transpose(-1, -2)) == 1  # column-major rows
    assert align_elems(q, torch.empty(B, H, N, D)) == 1  # mixed element sizes: no single hint
    assert strides(torch.empty(1, H, 1, D)) == (0, D, 0, 1)  # size-1 dims: stride never used
