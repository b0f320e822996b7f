"""Re-sample a finished run's DiT at several sampling settings; judge each with the default judge."""

import json
import sys
import time

import torch

from fastdae import measure as M
from fastdae.measure.judge import EvalConfig, build_judge
from fastdae.training.run import Run
from fastdae.training.samples import build_sampler

run_dir, n = sys.argv[1], int(sys.argv[2])
settings = [json.loads(a) for a in sys.argv[3:]]
r = Run.open(run_dir)
judge = build_judge(r.cfg, EvalConfig(), r.root, print)
print("reference", judge.reference)
for st in settings:
    t0 = time.perf_counter()
    st = dict(st)
    w = st.pop("weights", None)
    s = build_sampler(r, **st)
    if w:
        from fastdae.training.checkpoint import load_weights

        load_weights(r.root / w, s.dit)
    y = torch.arange(n) % s.num_classes
    res = []
    for seed in (0, 1):
        img = s.images(n, y, torch.Generator().manual_seed(100 + seed))
        res.append(M.sample_validity(judge.classifier, img, y))
    ca = sum(x["class_accuracy"] for x in res) / 2
    va = sum(x["validity"] for x in res) / 2
    print(
        json.dumps(st),
        f"class_acc {ca:.3f} validity {va:.3f} ({[round(x['validity'], 3) for x in res]})",
        f"{time.perf_counter() - t0:.0f}s",
        flush=True,
    )
