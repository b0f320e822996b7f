"""Re-sample a finished run's DiT (prior/dit.safetensors, EMA weights) at other guidance scales and
sampler step counts, decode with its final decoder (VQ: snapped), and judge: which sampling settings
the default should ship. 128 samples, labels cycling over the classes, seed 0.

usage: python results/prior-diagnosis/resample.py RUN_DIR OUT_JSON CFGS STEPS   (e.g. 2,4,6,8 25,50)"""

import sys

import torch
from common import decode, dump, judge, load_run, score

from fastdae import vq_nearest
from fastdae.models.diffusion import LatentScaler, make_diffusion
from fastdae.train.loop import load_weights
from fastdae.train.prior import build_dit

run, out = sys.argv[1], sys.argv[2]
cfgs, steps_list = [float(v) for v in sys.argv[3].split(",")], [int(v) for v in sys.argv[4].split(",")]
cfg, cache, z, labels, bottleneck, decoder = load_run(run)
scaler = LatentScaler(cache.channel_mean, cache.channel_std)
C, h = z.shape[1], z.shape[2]
model = build_dit(cfg, C)
load_weights(f"{run}/prior/dit.safetensors", model)
model.eval()
diffusion = make_diffusion(cfg.prior.objective, cfg.prior.schedule, cfg.prior.num_timesteps)
j = judge(cfg)
n = 128
y = torch.arange(n) % model.num_classes
res = {}
for steps in steps_list:
    for s in cfgs:
        with torch.no_grad():
            x = diffusion.sample(
                model,
                (n, C, h, h),
                y=y,
                steps=steps,
                sampler=cfg.prior.sampler,
                cfg_scale=s,
                generator=torch.Generator().manual_seed(0),
            )
            zz = scaler.denormalize(x)
            k, _ = vq_nearest(zz.permute(0, 2, 3, 1).reshape(-1, C), bottleneck.quantizer.codebook)
            imgs = decode(decoder, bottleneck.latent({"indices": k.view(n, h, h)}))
        res[f"cfg{s:g}_steps{steps}"] = score(j, imgs, y)
        print(f"cfg {s:g} steps {steps}", res[f"cfg{s:g}_steps{steps}"], flush=True)
dump(out, res)
