"""Measurement of trained runs and the studies of docs/paper.md §5.

    report = fastdae.evaluation.compare("x.yaml", arms=("joint", "dae", "control"), seeds=3, out_dir="results/c")
    report = fastdae.evaluation.ablation("x.yaml", knob="dropout", values=[0.0, 0.3], seeds=2)

What reads finished runs (above the trainer): evaluate.py (`evaluate_run`: every metric of one
finished run), report.py (summaries over seeds, pairwise tests, report.md / report.json / charts),
study.py (`compare`, `ablation`: train, evaluate, report). The judge (EvalConfig, Judge) and the
statistics (mean_ci, welch) live in fastdae.measure and are re-exported here.
"""

from fastdae.evaluation.evaluate import evaluate_run
from fastdae.evaluation.report import METRICS, PAIRS, markdown, pairwise_tests, write_report
from fastdae.evaluation.study import ARMS, KNOBS, ablation, compare
from fastdae.measure.judge import EvalConfig, Judge, build_judge
from fastdae.measure.stats import mean_ci, welch

__all__ = [
    "ARMS",
    "KNOBS",
    "METRICS",
    "PAIRS",
    "EvalConfig",
    "Judge",
    "ablation",
    "build_judge",
    "compare",
    "evaluate_run",
    "markdown",
    "mean_ci",
    "pairwise_tests",
    "welch",
    "write_report",
]
