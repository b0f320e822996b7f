"""Do the prior stage's batches carry the right labels? Batches from LatentCache.loader (shuffled,
as fastdae/train/prior.py reads them) are decoded by the run's final decoder and judged against the
batch's labels; a misaligned loader would score chance (0.25).

usage: python results/prior-diagnosis/loader_labels.py RUN_DIR"""

import sys

import torch
from common import decode, judge, load_run, score

cfg, cache, z, labels, bottleneck, decoder = load_run(sys.argv[1])
j = judge(cfg)
loader = cache.loader(64, seed=cfg.seed, num_workers=1)
loader.set_epoch(3)
imgs, ys = [], []
for k, fields in enumerate(loader):
    with torch.no_grad():
        imgs.append(decode(decoder, bottleneck.latent(fields)))
    ys.append(fields["label"])
    if k == 3:
        break
print("loader batches (epoch 3, shuffled):", score(j, torch.cat(imgs), torch.cat(ys)))
