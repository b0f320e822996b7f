"""The judge of a study (STUDY_DIR/judge, results/shapes-dae/eval.yaml settings) on runs' saved samples.

usage: judge_saved.py STUDY_DIR RUN..."""

import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from fastdae import measure as M
from fastdae.measure.judge import EvalConfig, build_judge
from fastdae.training.run import Run

ev = EvalConfig(**yaml.safe_load(open("results/shapes-dae/eval.yaml")))
judge = None
for d in sys.argv[2:]:
    r = Run.open(d)
    if judge is None:
        judge = build_judge(r.cfg, ev, Path(sys.argv[1]), lambda *a: None)
    s = load_file(f"{d}/samples/images.safetensors")
    print(d, {k: round(v, 3) for k, v in M.sample_validity(judge.classifier, s["images"], s["labels"]).items()})
