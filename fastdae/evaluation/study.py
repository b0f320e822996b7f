"""Studies: the three-arm comparison of docs/paper.md §5 and the ablation of the weakening knob.

    report = compare("x.yaml", arms=("joint", "dae", "control"), seeds=3, out_dir="results/compare")
    report = ablation("x.yaml", knob="width_mult", values=[0.25, 0.5, 1.0], seeds=2, out_dir="results/ablation")

Each (variant, seed) is one `fastdae.train` run (mode = the arm, seed = s) in out_dir/runs/<variant>-s<seed>;
the arms share every budget of the config, so they use equal compute: joint trains the full decoder
for stage1.steps + stage2.steps, dae and control train stage 1 for stage1.steps (weak / full decoder)
and a fresh full decoder for stage2.steps, and every arm trains the same DiT for prior.steps.
Then each run is evaluated (`evaluate_run`) against one `Judge` shared by all runs (built from the
dataset's held-out split only, which no run trains on; see EvalConfig), and out_dir gets
report.md (mean ± std and 95% interval over seeds per metric per variant; for the arms, Welch's
t-test of each pair of PAIRS per metric, as a sentence), report.json (every number), metrics.png
(bars with ±std) and samples.png (each variant's seed-0 sample grid side by side).

Runs resume: finished stages and evaluations (runs/<name>/eval.json) are reused, so an interrupted
study continues where it stopped, and more seeds add runs; an eval.json is reused only when its run's
config and the EvalConfig are the ones it was made with (a run folder trained with another config
is refused, not mixed in). What is evaluated, on which data, is in `EvalConfig`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fastdae import files
from fastdae.config import MODES, TrainConfig, apply_overrides, load_config
from fastdae.evaluation.evaluate import evaluate_run
from fastdae.evaluation.report import METRICS, capacity_curves, pairwise_tests, summarize, write_report
from fastdae.measure.judge import EvalConfig, build_judge, device_of
from fastdae.training.identity import RUN_CONTROL, differences, flatten
from fastdae.training.paths import RunFolder

ARMS = MODES  # ("dae", "joint", "control")
KNOBS = ("width_mult", "num_res_blocks", "dropout")  # WeakDecoderConfig fields


def _run_study(
    cfg: TrainConfig,
    variants: dict[str, dict[str, Any]],
    seeds: int,
    out_dir: Path,
    ev: EvalConfig,
    title: str,
    command: str | None,
    log: Any,
) -> dict[str, Any]:
    """Train and evaluate every variant (config overrides) for seeds 0..seeds-1; write the report."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = build_judge(cfg, ev, out_dir, log)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    grids: dict[str, str] = {}  # variant -> its seed-0 sample grid (samples.png)
    for s in range(seeds):  # seeds outermost: a study stopped early still has every variant at equal seeds
        for name, overrides in variants.items():
            run_dir = out_dir / "runs" / f"{name}-s{s}"
            # the study's judge scores the samples: no per-run judge (prior.judge_steps 0)
            run_cfg = apply_overrides(
                cfg, {**overrides, "seed": s, "out_dir": str(run_dir), "resume": True, "prior.judge_steps": 0}
            )
            eval_file = run_dir / "eval.json"
            identity = _eval_identity(run_cfg, ev)
            if s == 0:
                grids[name] = str(RunFolder(run_cfg).sample_grid)
            earlier = files.read_json_object(eval_file)  # absent or edited: evaluated again
            if earlier is not None and _same_eval(earlier, identity):
                runs[name].append(earlier)  # evaluated earlier with this config and judge: reuse
                continue
            from fastdae.training import train

            t0 = time.perf_counter()
            summary = train(run_cfg).metrics  # refuses a folder trained with another config
            result = evaluate_run(run_cfg, judge, ev)
            result["train_wall_s"] = summary["wall_s"]
            result["identity"] = identity
            files.write_json(eval_file, result)
            log(f"{name} seed {s}: trained and evaluated in {time.perf_counter() - t0:.0f} s")
            runs[name].append(result)
    report = {
        "title": title,
        "command": command,
        "config": cfg.to_dict(),
        "eval": asdict(ev),
        "seeds": seeds,
        "reference": judge.reference,
        "split": judge.split,
        "summary": summarize(runs),
        "tests": pairwise_tests(runs),
        "capacity": capacity_curves(runs),
        "runs": runs,
        "sample_grids": grids,
        "device": str(device_of(cfg)),
        "torch": torch.__version__,
    }
    write_report(report, out_dir)
    return report


def _eval_identity(run_cfg: TrainConfig, ev: EvalConfig) -> dict[str, Any]:
    """What a run's eval.json depends on: its config (run-control keys aside) and the EvalConfig."""
    own = flatten(run_cfg.to_dict())
    return {"config": {k: v for k, v in own.items() if k not in RUN_CONTROL}, "eval": asdict(ev)}


def _same_eval(earlier: dict[str, Any], identity: dict[str, Any]) -> bool:
    """An eval.json is reused for the same EvalConfig and config (keys added to the config since it
    was written count as unchanged at their defaults, as on resume)."""
    rec = earlier.get("identity")
    return rec is not None and rec["eval"] == identity["eval"] and not differences(rec["config"], identity["config"])


def compare(
    config: TrainConfig | dict | str | Path,
    arms: Sequence[str] = ("joint", "dae", "control"),
    seeds: int = 3,
    out_dir: str | Path = "results/compare",
    eval_config: EvalConfig | None = None,
    command: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """docs/paper.md §5: the arms at equal compute, `seeds` seeds each; returns the report dict (also
    written to out_dir as report.md / report.json / metrics.png / samples.png)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"arms must be a non-empty subset of {ARMS}, got {list(arms)}")
    cfg = load_config(config)
    return _run_study(
        cfg,
        {a: {"mode": a} for a in arms},
        seeds,
        Path(out_dir),
        eval_config or EvalConfig(),
        "DAE comparison (docs/paper.md §5)",
        command,
        log,
    )


def ablation(
    config: TrainConfig | dict | str | Path,
    knob: str,
    values: Sequence[Any],
    seeds: int = 2,
    out_dir: str | Path = "results/ablation",
    eval_config: EvalConfig | None = None,
    select: str = "fd_feat",
    command: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """The weakening knob of the auxiliary decoder (weak_decoder.<knob> in KNOBS) over `values`, in
    mode dae; report["best"] is the value with the best mean `select` metric."""
    if knob not in KNOBS:
        raise ValueError(f"knob must be one of {KNOBS}, got {knob!r}")
    directions = {k: d for k, _, d in METRICS}
    if select not in directions:
        raise ValueError(f"select must be one of {sorted(directions)}, got {select!r}")
    cfg = load_config(config)
    variants = {f"{knob}={v}": {"mode": "dae", f"weak_decoder.{knob}": v} for v in values}
    report = _run_study(
        cfg,
        variants,
        seeds,
        Path(out_dir),
        eval_config or EvalConfig(),
        f"Ablation of weak_decoder.{knob} (mode dae)",
        command,
        log,
    )
    scored = {name: s[select]["mean"] for name, s in report["summary"].items() if select in s}
    if scored:
        best = (max if directions[select] > 0 else min)(scored, key=scored.get)
        report["best"] = {"variant": best, "select": select, "mean": scored[best]}
        write_report(report, Path(out_dir))
    return report
