"""Confusion matrix of a finished run's samples under a judge cached in JUDGE_DIR; a grid of the first 40.

usage: confusion.py RUN JUDGE_DIR N GRID.png"""

import sys
from pathlib import Path

import torch

from fastdae.measure.judge import EvalConfig, build_judge
from fastdae.training.logs import save_grid
from fastdae.training.run import Run
from fastdae.training.samples import build_sampler

run_dir, judge_dir, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
r = Run.open(run_dir)
judge = build_judge(r.cfg, EvalConfig(classifier_steps=300), judge_dir, lambda *a: None)
s = build_sampler(r)
y = torch.arange(n) % s.num_classes
img = s.images(n, y, torch.Generator().manual_seed(100))
with torch.no_grad():
    p = judge.classifier(img).softmax(-1)
pred = p.argmax(-1)
C = torch.zeros(5, 5, dtype=torch.long)
for a, b in zip(y, pred, strict=True):
    C[a, b] += 1
print("rows asked, cols judged (stripes checks dots rings waves)\n", C)
save_grid(img[:40], sys.argv[4], nrow=10)
