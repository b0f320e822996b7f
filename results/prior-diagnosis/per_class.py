"""Per-class class accuracy and validity of a run's own judged samples (samples/images.safetensors; sixth pass).

usage: per_class.py RUN"""

import sys

import torch
from safetensors.torch import load_file

from fastdae import measure as M
from fastdae.measure.judge import EvalConfig, build_judge
from fastdae.training.run import Run

r = Run.open(sys.argv[1])
judge = build_judge(r.cfg, EvalConfig(), r.root, lambda *a: None)
d = load_file(str(r.root / "samples/images.safetensors"))
img, y = d["images"], d["labels"]
with torch.no_grad():
    p = judge.classifier(img).softmax(1)
conf, pred = p.max(1)
for c in range(int(y.max()) + 1):
    m = y == c
    print(
        c, "acc", (pred[m] == c).float().mean().item(), "valid", (conf[m] >= M.VALIDITY_THRESHOLD).float().mean().item()
    )
