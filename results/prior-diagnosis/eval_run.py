"""Judge a finished run of `python -m fastdae train`: the judge classifier's validity and class accuracy
of its decoded DiT samples (samples/images.safetensors, labels cycling over the classes), and the final
decoder's reconstructions of 256 held-out images (ProceduralShapes seed data.seed + 1: PSNR, mean-colour
error, and a grid, top real / bottom reconstructed, written next to OUT_JSON).

usage: python results/prior-diagnosis/eval_run.py RUN_DIR OUT_JSON"""

import shutil
import sys
from pathlib import Path

import torch
from common import decode, dump, judge, score
from safetensors.torch import load_file

from fastdae import measure as M
from fastdae.compare import _load_autoencoder
from fastdae.config import TrainConfig
from fastdae.data import ProceduralShapes
from fastdae.train.loop import save_grid

run, out = Path(sys.argv[1]), sys.argv[2]
cfg = TrainConfig.load(run / "config.yaml")
cfg.out_dir = str(run)
j = judge(cfg)
saved = load_file(str(run / "samples" / "images.safetensors"))
res = {"samples": score(j, saved["images"], saved["labels"]), "num_samples": len(saved["labels"]), "judge": j.reference}
encoder, bottleneck, decoder = _load_autoencoder(cfg, torch.device("cpu"))
x, _ = ProceduralShapes(256, cfg.data.size, cfg.data.seed + 1).images(list(range(256)))
with torch.no_grad():
    z = torch.cat([bottleneck.encode_fields(encoder(c))[1] for c in x.split(64)])
x_hat = decode(decoder, z)
res["reconstruction"] = {
    "psnr": M.psnr(x, x_hat).mean().item(),
    "mean_colour_abs_err": (x.mean((2, 3)) - x_hat.mean((2, 3))).abs().mean().item(),
}
stem = out.replace(".json", "")
save_grid(torch.cat([x[:8], x_hat[:8]]), stem + "_reconstructions.png", nrow=8)
shutil.copy(run / "samples" / "grid.png", stem + "_samples.png")
summary = run / "summary.json"
if summary.is_file():
    import json

    s = json.loads(summary.read_text())
    res["wall_s"] = s.get("wall_s")
    res["stage_wall_s"] = {k: v.get("wall_s") for k, v in s["stages"].items()}
dump(out, res)
