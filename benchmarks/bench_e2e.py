"""The whole DAE recipe end to end: fastdae vs the same recipe assembled the common way, and what CPU
bf16 autocast does to fastdae's recipe.

    pytest benchmarks/bench_e2e.py --benchmark-only --benchmark-json=benchmarks/results/<device>-e2e-<date>.json
    python benchmarks/e2e_report.py <that json> > benchmarks/results/<device>-e2e-<date>.md

Group `e2e-recipe-<size>px`, each member one run of stage 1 + cache + stage 2 + prior (no sampling),
rounds interleaved (r0 fastdae, r0 common-way, r1 common-way, r1 fastdae, ...) so machine load hits
both alike:
  fastdae     `fastdae.train(config)`, one public call with stages [stage1, cache, stage2, prior];
              the per-stage split is the wall_s of each stage in the returned Result's metrics.
  common-way  the same recipe written the usual way: benchmarks/baseline_recipe.py (what it swaps
              and why is written there). Its "cache" stage is empty (0 s).
extra_info: total and per-stage seconds (stage1, cache, stage2, prior, other = setup outside the
stages), per-step loop times, the recipe's sizes and the 1-minute load average before and after.
The ratio is common-way / fastdae total wall time, per round and its median. A warm-up run of both
at quick size comes first (imports, loading the C++ ops): one-time process costs are not measured.
CPU: every member runs with one intra-op thread (CPU_THREADS: why there).

The recipe is preset "vq" (32 px shapes, AE ch 16 f=4 VQ-128, DiT-T/2, batch 16/16/32; the common
way's quantizer needs the VQ; its GAN is off, disc.weight 0, in both members) scaled down 16x in steps
and dataset size, so every stage sees as many epochs as in the preset (stage 2: 1.6, prior: 3.9), with
LPIPS on (random VGG16 init: there are no weights here, and a random trunk costs what a trained one
does). GPU: the same recipe (not measured: no GPU was available).

Group `e2e-precision-<size>px` (CPU only): the default preset (the README's main job) in full, stages
stage1..prior, once with precision fp32 and once with bf16 (fastdae.precision: bf16 autocast in the
autoencoder stages, the prior in fp32), same seed, rounds interleaved; extra_info: per-stage seconds
and the end-of-stage reconstruction PSNR of stage 1 and stage 2 (the default preset has no LPIPS).

Sizes (FASTDAE_BENCH_SIZE): "quick" (the tiny preset at 2 steps a stage, one round: what
tests/benchmarks/test_bench_e2e.py runs with --benchmark-disable, a check and not a measurement),
"one-step" (every member at its full configuration for one step a stage, one round: what CI runs so a
full-size member cannot rot unseen) and "full" (the default: the measurement).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from baseline_recipe import PackageHeadLPIPS, TamingQuantizer, run_common_way  # benchmarks/ is on sys.path

import fastdae
from fastdae.config import TrainConfig, preset
from fastdae.models.autoencoder import build_encoder
from fastdae.models.dit import DiT_models

STAGES = ("stage1", "cache", "stage2", "prior")
VARIANTS = ("fastdae", "common-way")
PRECISIONS = ("fp32", "bf16")
SIZES = ("quick", "one-step", "full")
# FASTDAE_BENCH_QUICK=1 is the older spelling of FASTDAE_BENCH_SIZE=quick
SIZE = os.environ.get("FASTDAE_BENCH_SIZE", "quick" if os.environ.get("FASTDAE_BENCH_QUICK") == "1" else "full")
if SIZE not in SIZES:
    raise ValueError(f"FASTDAE_BENCH_SIZE must be one of {SIZES}, got {SIZE!r}")
QUICK = SIZE == "quick"
ROUNDS = 3 if SIZE == "full" else 1
PRECISION_ROUNDS = 2 if SIZE == "full" else 1
# CPU: one intra-op thread for every member. On the shared 2-core machine two threads under load made
# a DiT-T/2 training step 80x slower (7.4 s vs 93 ms median, 2026-12-01): barrier waits, not work.
CPU_THREADS = 1


def _steps(full: dict[str, int], size: str) -> dict[str, int]:
    """Steps per stage at `size`: 2 (quick), 1 (one-step) or the full recipe's."""
    return {k: {"quick": 2, "one-step": 1}.get(size, v) for k, v in full.items()}


def _once(steps: dict[str, int]) -> dict[str, dict[str, int]]:
    """Each stage logs and checkpoints once, at its end."""
    return {name: {"steps": n, "log_every": n, "ckpt_every": n} for name, n in steps.items()}


def recipe(out_dir: str | Path, size: str = SIZE) -> dict[str, Any]:
    """The config dict both members of e2e-recipe run: the vq preset / 16 in steps and data (see the
    module docstring); quick: the tiny preset."""
    if size == "quick":
        disc = {"ndf": 8, "n_layers": 1, "start": 1}
        base, data = "tiny", {"num_samples": 64}
    else:
        disc = {"ndf": 16, "n_layers": 2, "start": 12}  # the preset's start 200, / 16 (its weight 0: GAN off)
        base, data = "vq", {"num_samples": 256}  # 4096 / 16
    once = _once(_steps({"stage1": 25, "stage2": 25, "prior": 31}, size))  # the preset's 400 / 400 / 500, / 16
    lpips = {"lpips_random_init": True, "lpips_weight": 1.0, "disc": disc}
    return TrainConfig.from_dict(
        {
            "out_dir": str(out_dir),
            "stages": list(STAGES),
            "progress": False,
            "data": data,
            "stage1": {**once["stage1"], **lpips},
            "stage2": {**once["stage2"], **lpips},
            "prior": once["prior"],
        },
        base=preset(base),
    ).to_dict()


def precision_recipe(out_dir: str | Path, precision: str, size: str = SIZE) -> dict[str, Any]:
    """What the e2e-precision members run: the default preset (quick: tiny) in full, stages
    stage1..prior, at `precision` on the CPU."""
    base = preset("tiny" if size == "quick" else "default")
    full = {s: getattr(base, s).steps for s in ("stage1", "stage2", "prior")}
    steps = _steps(full, size) if size != "full" else full
    over = {s: {"steps": n, "ckpt_every": n} for s, n in steps.items()}
    return TrainConfig.from_dict(
        {"out_dir": str(out_dir), "stages": list(STAGES), "progress": False, "precision": precision, "device": "cpu"}
        | over,
        base=base,
    ).to_dict()


def run_fastdae(config: dict[str, Any]) -> dict[str, Any]:
    """One public fastdae.train call; the per-stage split from the Result's metrics."""
    result = fastdae.train(config)
    stages = result.metrics["stages"]
    return {
        "wall": {s: stages[s]["wall_s"] for s in STAGES},
        "loop": {s: stages[s]["time_s"] for s in ("stage1", "stage2", "prior")},
        "final": {
            "stage1_psnr": stages["stage1"]["eval"]["psnr"],
            "stage2_psnr": stages["stage2"]["eval"]["psnr"],
            **{s: stages[s]["final"]["loss"] for s in ("stage1", "stage2", "prior")},
        },
    }


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"fastdae": run_fastdae, "common-way": run_common_way}


def run_recipe(variant: str, config: dict[str, Any]) -> dict[str, Any]:
    """Runs one member; adds the total wall time and `other` (time outside the four stages)."""
    t = time.perf_counter()
    split = RUNNERS[variant](config)
    split["total"] = time.perf_counter() - t
    split["wall"]["other"] = split["total"] - sum(split["wall"][s] for s in STAGES)
    return split


def flat_info(variant: str, split: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """extra_info fields of one run: seconds per stage, ms per loop step, the recipe's sizes."""
    steps = {s: config[s]["steps"] for s in ("stage1", "stage2", "prior")}
    info: dict[str, Any] = {"variant": variant, "total_s": split["total"]}
    info |= {f"{s}_s": v for s, v in split["wall"].items()}
    info |= {f"{s}_loop_ms_per_step": 1e3 * v / steps[s] for s, v in split["loop"].items()}
    info |= {f"final_{k}": v for k, v in split["final"].items()}
    info |= {f"{s}_steps": n for s, n in steps.items()}
    info |= {
        "stage1_batch": config["stage1"]["batch_size"],
        "stage2_batch": config["stage2"]["batch_size"],
        "prior_batch": config["prior"]["batch_size"],
        "image_size": config["data"]["size"],
        "num_samples": config["data"]["num_samples"],
        "dit": config["prior"]["model"],
    }
    return info


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def warmed(threads, tmp_path_factory) -> None:
    """Both members once at quick size before the timed runs: imports, the C++ ops' load, allocator.
    Quick mode's one run is not a measurement: nothing to warm."""
    if SIZE != "full":
        return
    for variant in VARIANTS:
        run_recipe(variant, recipe(tmp_path_factory.mktemp(f"warm-{variant}"), size="quick"))


# rounds interleaved, alternating which member goes first
ORDER = [(r, v) for r in range(ROUNDS) for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1])]
_TOTALS: dict[int, dict[str, float]] = {}  # round -> variant -> total seconds, for the round's ratio


@pytest.mark.parametrize("round_,variant", ORDER, ids=[f"r{r}-{v}" for r, v in ORDER])
def test_e2e_recipe(benchmark, record, warmed, tmp_path, round_, variant):
    config = recipe(tmp_path / "run")
    splits: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    benchmark.group = f"e2e-recipe-{config['data']['size']}px"
    benchmark.pedantic(lambda: splits.append(run_recipe(variant, config)), rounds=1, iterations=1, warmup_rounds=0)
    split = splits[0]
    totals = _TOTALS.setdefault(round_, {})
    totals[variant] = split["total"]
    ratio = {"round_ratio_common_over_fastdae": totals["common-way"] / totals["fastdae"]} if len(totals) == 2 else {}
    record(
        round=round_,
        load_avg_1min_before=load_before,
        load_avg_1min_after=os.getloadavg()[0],
        **flat_info(variant, split, config),
        **ratio,
    )
    assert set(split["wall"]) == {*STAGES, "other"} and all(v >= 0 for v in split["wall"].values())
    assert all(math.isfinite(v) for v in split["final"].values()), split["final"]


@pytest.mark.parametrize("component", ["lpips-loss", "frozen-encode"])
def test_e2e_component(benchmark, record, warmed, tmp_path, component):
    """What dominates the recipe's steps on a CPU, at the recipe's shapes: the LPIPS loss both members
    pay in every stage-1/2 step (VGG16 on x_hat and x, backward through x_hat; stage batch), and the
    frozen encoder + quantizer forward the common way adds to every stage-2 and prior step (prior batch)."""
    cfg = TrainConfig.from_dict(recipe(tmp_path))
    torch.manual_seed(0)
    size = cfg.data.size
    if component == "lpips-loss":
        from fastdae.nn import LPIPS

        lpips, batch = LPIPS(random_init=True, check_range=False), cfg.stage1.batch_size
        x, x_hat = torch.rand(2, batch, 3, size, size).mul(2).sub(1).unbind(0)
        x_hat.requires_grad_(True)

        def run() -> None:
            lpips(x_hat, x).mean().backward()

    else:
        ae, batch = cfg.autoencoder, cfg.prior.batch_size
        encoder = build_encoder(ae).eval().requires_grad_(False)
        quantizer = TamingQuantizer(ae.num_codes, ae.z_channels, ae.vq_beta).eval()
        x = torch.rand(batch, 3, size, size).mul(2).sub(1)
        run = torch.no_grad()(lambda: quantizer(encoder(x)))
    benchmark.group = f"e2e-components-{size}px"
    benchmark.pedantic(run, rounds=7 if SIZE == "full" else 1, warmup_rounds=1)
    record(component=component, batch=batch, image_size=size)


PRECISION_ORDER = [(r, p) for r in range(PRECISION_ROUNDS) for p in (PRECISIONS if r % 2 == 0 else PRECISIONS[::-1])]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's bf16 units; on CUDA bf16 is the default")
@pytest.mark.parametrize("round_,precision", PRECISION_ORDER, ids=[f"r{r}-{p}" for r, p in PRECISION_ORDER])
def test_e2e_precision(benchmark, record, warmed, tmp_path, round_, precision):
    """The default preset at fp32 and at bf16 on the CPU, same seed: wall time per stage and the
    reconstruction PSNR of stage 1 and stage 2 (their end-of-stage eval of held-out images)."""
    config = precision_recipe(tmp_path / "run", precision)
    results: list[Any] = []
    load_before = os.getloadavg()[0]
    benchmark.group = f"e2e-precision-{config['data']['size']}px"
    t = time.perf_counter()
    benchmark.pedantic(lambda: results.append(fastdae.train(config)), rounds=1, iterations=1, warmup_rounds=0)
    total = time.perf_counter() - t
    stages = results[0].metrics["stages"]
    record(
        round=round_,
        precision=precision,
        load_avg_1min_before=load_before,
        load_avg_1min_after=os.getloadavg()[0],
        total_s=total,
        **{f"{s}_s": stages[s]["wall_s"] for s in STAGES},
        **{
            f"{s}_loop_ms_per_step": 1e3 * stages[s]["time_s"] / config[s]["steps"]
            for s in ("stage1", "stage2", "prior")
        },
        **{f"{s}_psnr": stages[s]["eval"]["psnr"] for s in ("stage1", "stage2")},
        prior_final_loss=stages["prior"]["final"]["loss"],
        **{f"{s}_steps": config[s]["steps"] for s in ("stage1", "stage2", "prior")},
        image_size=config["data"]["size"],
    )
    assert all(math.isfinite(stages[s]["eval"]["psnr"]) for s in ("stage1", "stage2"))


STEP_STAGES = ("stage1", "stage2", "prior")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's bf16 units; on CUDA bf16 is the default")
@pytest.mark.parametrize("stage", STEP_STAGES)
@pytest.mark.parametrize("precision", [*PRECISIONS, "bf16-everywhere"])
def test_e2e_precision_step(benchmark, record, threads, stage, precision):
    """One training step (forward + backward, fastdae.plan.stage_models: the trainer's models and loss,
    LPIPS on with a random VGG16) of the default preset's stage at its batch, under the stage's autocast
    (fastdae.precision) at fp32 and at bf16: the per-step effect the whole-recipe members average out.
    "bf16-everywhere" autocasts the stage whatever the policy says: for the prior, what the policy avoids."""
    from fastdae.plan import stage_models
    from fastdae.precision import autocast, resolve

    cfg = preset("tiny" if QUICK else "default")
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    models = stage_models(cfg, stage, cpu)
    batch = getattr(cfg, stage).batch_size

    def step() -> None:
        if precision == "bf16-everywhere":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                models.step(batch, False)
            return
        with autocast(cpu, precision, stage):
            models.step(batch, False)

    load_before = os.getloadavg()[0]
    benchmark.group = f"e2e-precision-step-{stage}"
    benchmark.pedantic(step, rounds=9 if SIZE == "full" else 1, warmup_rounds=1)
    record(
        stage=stage,
        precision=precision,
        autocast="bf16" if precision == "bf16-everywhere" else resolve(cpu, precision, stage),
        batch=batch,
        load_avg_1min_before=load_before,
        load_avg_1min_after=os.getloadavg()[0],
    )


# ---------------------------------------------------------------------------------------------
# The swapped-in ops compute what they stand for (run with --benchmark-disable; skipped by --benchmark-only)
# ---------------------------------------------------------------------------------------------
def test_taming_quantizer_is_taming_vector_quantizer():
    """Codes, z_q and perplexity equal the installed taming-transformers VectorQuantizer's; the loss and
    its gradients equal fastdae.vector_quantize's (the beta convention both use)."""
    taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")
    torch.manual_seed(0)
    ours = TamingQuantizer(64, 4, 0.25)
    theirs = taming_quantize.VectorQuantizer(64, 4, 0.25)
    theirs.load_state_dict(ours.state_dict())
    ours.embedding.weight.data.normal_()  # spread codes so that many are used
    theirs.embedding.weight.data.copy_(ours.embedding.weight.data)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    z_q, loss, (perplexity, one_hot, idx) = ours(z)
    t_zq, _, (t_perplexity, t_one_hot, t_idx) = theirs(z)
    assert torch.equal(idx, t_idx) and torch.equal(one_hot, t_one_hot)
    torch.testing.assert_close(z_q, t_zq)
    torch.testing.assert_close(perplexity, t_perplexity)

    codebook = ours.embedding.weight.detach().clone().requires_grad_(True)
    z2 = z.detach().clone().requires_grad_(True)
    ref = fastdae.vector_quantize(z2.permute(0, 2, 3, 1), codebook, 0.25)
    torch.testing.assert_close(ref.indices.reshape(-1), idx[:, 0])
    torch.testing.assert_close(loss, ref.loss)
    (z_q.square().sum() + loss).backward()
    (ref.z_q.square().sum() + ref.loss).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(ours.embedding.weight.grad, codebook.grad)


def test_package_head_lpips_is_fastdae_lpips():
    """The lpips package's head on fastdae's trunk gives fastdae's LPIPS distance and input gradient."""
    from fastdae.nn import LPIPS

    torch.manual_seed(0)
    lpips = LPIPS(random_init=True)
    x0, x1 = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    a, b = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    d_ours, d_theirs = lpips(a, x1), PackageHeadLPIPS(lpips)(b, x1)
    torch.testing.assert_close(d_theirs.reshape(-1), d_ours.reshape(-1), rtol=1e-4, atol=1e-6)  # (B,) or (B, 1, 1, 1)
    d_ours.sum().backward()
    d_theirs.sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-7)


def test_common_way_dit_uses_the_reference_attention():
    dit = DiT_models["DiT-T/2"](input_size=8, in_channels=4, num_classes=4, attn_impl="ref")
    assert all(block.attn.impl == "ref" for block in dit.blocks)
