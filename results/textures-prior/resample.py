"""Re-sample a finished run's DiT at several settings (JSON args), judged by a judge cached in JUDGE_DIR.

usage: resample.py RUN JUDGE_DIR N SETTINGS..."""

import json
import sys
import time
from pathlib import Path

import torch

from fastdae import measure as M
from fastdae.measure.judge import EvalConfig, build_judge
from fastdae.training.checkpoint import load_weights
from fastdae.training.run import Run
from fastdae.training.samples import build_sampler

run_dir, judge_dir, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
r = Run.open(run_dir)
judge = build_judge(r.cfg, EvalConfig(classifier_steps=300), judge_dir, lambda *a: None)
for a in sys.argv[4:]:
    st = json.loads(a)
    w = st.pop("weights", None)
    t0 = time.perf_counter()
    s = build_sampler(r, **st)
    if w:
        load_weights(run_dir / w, s.dit)
    y = torch.arange(n) % s.num_classes
    img = s.images(n, y, torch.Generator().manual_seed(100))
    res = M.sample_validity(judge.classifier, img, y)
    print(a, {k: round(v, 3) for k, v in res.items()}, f"{time.perf_counter() - t0:.0f}s", flush=True)
