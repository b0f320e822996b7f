"""Is the VQ latent space usable, are the latents scaled sensibly, and does snapping destroy samples?

usage: python results/prior-diagnosis/vq_space.py RUN_DIR OUT_JSON
- code usage / perplexity of the cached indices (exp of the entropy of the code histogram);
- the cache's per-channel mean/std (what LatentScaler uses) against the same statistics recomputed
  from the codebook vectors of the cached indices;
- the codebook in scaled units: the nearest-other-code distance of the used codes;
- snapping: real latents, scaled, plus Gaussian noise of std s, unscaled, snapped with vq_nearest:
  the fraction of positions that keep their code, and the judge's class accuracy of the decoded images;
- the final decoder on the clean cached latents: the judge's validity / class accuracy (the ceiling
  the prior can reach through this decoder)."""

import sys

import torch
from common import decode, dump, judge, load_run, score

from fastdae import vq_nearest
from fastdae.models.diffusion import LatentScaler

run, out = sys.argv[1], sys.argv[2]
cfg, cache, z, labels, bottleneck, decoder = load_run(run)
idx = cache.gather(list(range(len(cache))))["indices"].long()
K = cfg.autoencoder.num_codes
counts = torch.bincount(idx.flatten(), minlength=K).double()
p = counts / counts.sum()
perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
recomputed = LatentScaler.from_data(z)
scaler = LatentScaler(cache.channel_mean, cache.channel_std)
codebook = bottleneck.quantizer.codebook.detach()  # (K, D)
used = counts > 0
cb_n = (codebook - scaler.mean) / scaler.std
d = torch.cdist(cb_n[used], cb_n[used])
d.fill_diagonal_(float("inf"))
nn_dist = d.min(1).values
j = judge(cfg)
res = {
    "num_codes": K,
    "codes_used": int(used.sum()),
    "perplexity": perplexity,
    "cache_channel_mean": cache.channel_mean.tolist(),
    "cache_channel_std": cache.channel_std.tolist(),
    "recomputed_mean": recomputed.mean.tolist(),
    "recomputed_std": recomputed.std.tolist(),
    "nearest_other_code_dist_scaled": {
        "min": float(nn_dist.min()),
        "median": float(nn_dist.median()),
        "max": float(nn_dist.max()),
    },
}
n = 512
zs, ys = z[:n], labels[:n]
res["real_latents_decoded"] = score(j, decode(decoder, zs), ys)
g = torch.Generator().manual_seed(0)
C, h = zs.shape[1], zs.shape[2]
snap = {}
for s in (0.05, 0.1, 0.2, 0.3, 0.5):
    noisy = scaler.denormalize(scaler.normalize(zs) + s * torch.randn(zs.shape, generator=g))
    k, _ = vq_nearest(noisy.permute(0, 2, 3, 1).reshape(-1, C), codebook)
    kept = float((k.view(n, h, h) == idx[:n]).double().mean())
    snapped = bottleneck.latent({"indices": k.view(n, h, h)})
    snap[str(s)] = {
        "codes_kept": kept,
        "snapped": score(j, decode(decoder, snapped), ys),
        "unsnapped": score(j, decode(decoder, noisy), ys),
    }
res["snap_noise"] = snap
dump(out, res)
