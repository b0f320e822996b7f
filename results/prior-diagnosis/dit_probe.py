"""The prior in isolation: the same DiT, objective, optimiser, EMA and sampler as fastdae/train/prior.py,
on a finished run's cached latents or on a trivially learnable latent set, one thread.

usage: python results/prior-diagnosis/dit_probe.py OUT_JSON --run RUN_DIR [--data cache|pattern]
       [--n N] [--steps S] [--lr LR] [--batch B] [--model DiT-T/2] [--objective flow] [--warmup W]
       [--ema 0.999] [--dropout 0.1] [--sample-steps 25] [--cfg 1,2,4] [--shuffle-labels] [--eval-at 500,1000]

--data cache: the run's latents (codebook vectors of the cached indices), scaled by the cache's
  per-channel statistics (LatentScaler), exactly as the prior stage; --n keeps the first N (overfit test).
  Samples are unscaled, snapped (VQ) and decoded by the run's final decoder, then judged.
--data pattern: latents = P[label] + 0.1 noise, P (4, C, h, w) fixed N(0, 1) patterns, same shape as the
  run's latents; a sample counts as its class when its nearest pattern is the asked-for one.
Reported: loss (mean of the last 10% of steps), the conditional vs null-label loss on one fixed
held batch (does the label carry information?), and for each cfg scale and for EMA and raw weights,
the samples' class accuracy (+ judge validity on cache data)."""

import argparse

import torch
from common import Timer, decode, dump, judge, load_run, score

from fastdae import vq_nearest
from fastdae.models.diffusion import LatentScaler, make_diffusion
from fastdae.models.dit import DiT_models
from fastdae.train.loop import EMA, make_optimizer

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--run", required=True)
ap.add_argument("--data", default="cache", choices=["cache", "pattern"])
ap.add_argument("--n", type=int, default=0)
ap.add_argument("--steps", type=int, default=500)
ap.add_argument("--lr", type=float, default=3e-4)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--model", default="DiT-T/2")
ap.add_argument("--objective", default="flow")
ap.add_argument("--warmup", type=int, default=0)
ap.add_argument("--ema", type=float, default=0.999)
ap.add_argument("--dropout", type=float, default=0.1)
ap.add_argument("--sample-steps", type=int, default=25)
ap.add_argument("--sampler", default="euler")
ap.add_argument("--cfg", default="1")
ap.add_argument("--num-samples", type=int, default=128)
ap.add_argument("--shuffle-labels", action="store_true")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--eval-at", default="", help="steps at which the EMA model's samples are judged (cfg 1 and max cfg)")
args = ap.parse_args()

cfg, cache, z, labels, bottleneck, decoder = load_run(args.run)
scaler = LatentScaler(cache.channel_mean, cache.channel_std)
torch.manual_seed(args.seed)
if args.data == "cache":
    x_all = scaler.normalize(z)
else:
    patterns = torch.randn((4, *z.shape[1:]), generator=torch.Generator().manual_seed(123))
    x_all = patterns[labels] + 0.1 * torch.randn(z.shape)
y_all = labels.clone()
if args.n:
    x_all, y_all = x_all[: args.n], y_all[: args.n]
if args.shuffle_labels:
    y_all = y_all[torch.randperm(len(y_all))]
C, h = x_all.shape[1], x_all.shape[2]
model = DiT_models[args.model](
    input_size=h, in_channels=C, num_classes=4, learn_sigma=False, class_dropout_prob=args.dropout
)
diffusion = make_diffusion(args.objective, "linear", 1000)
opt, sched = make_optimizer(model.parameters(), args.lr, (0.9, 0.999), args.warmup)
ema = EMA(model, args.ema) if args.ema > 0 else None


@torch.no_grad()
def evaluate(net, s: float, grid: bool = False) -> dict:
    """Class accuracy (pattern data) or the judge's validity / class accuracy (cache data) of
    args.num_samples samples, labels cycling over the classes, at cfg scale s."""
    net.eval()
    n = args.num_samples
    y = torch.arange(n) % 4
    gen = torch.Generator().manual_seed(7)
    xs = diffusion.sample(
        net, (n, C, h, h), y=y, steps=args.sample_steps, sampler=args.sampler, cfg_scale=s, generator=gen
    )
    if args.data == "pattern":
        d = torch.cdist(xs.flatten(1), patterns.flatten(1))  # (n, 4)
        return {
            "class_accuracy": float((d.argmin(1) == y).double().mean()),
            "dist_to_own_pattern_rms": float((d[torch.arange(n), y] ** 2 / xs[0].numel()).mean().sqrt()),
            "sample_std": float(xs.std()),
        }
    zz = scaler.denormalize(xs)
    k, _ = vq_nearest(zz.permute(0, 2, 3, 1).reshape(-1, C), bottleneck.quantizer.codebook)
    snapped = bottleneck.latent({"indices": k.view(n, h, h)})
    imgs = decode(decoder, snapped)
    if grid:
        from fastdae.train.loop import save_grid

        save_grid(imgs[:64], args.out.replace(".json", ".png"))
    return {
        "snapped": score(j, imgs, y),
        "unsnapped": score(j, decode(decoder, zz), y),
        "sample_std_scaled": float(xs.std()),
    }


g = torch.Generator().manual_seed(args.seed)
losses = []
curve = []
eval_at = {int(v) for v in args.eval_at.split(",") if v}
j = judge(cfg) if args.data == "cache" else None
model.train()
train_s = 0.0
for i in range(args.steps):
    with Timer() as tm:
        b = torch.randint(0, len(x_all), (args.batch,), generator=g)
        loss = diffusion.loss(model, x_all[b], y_all[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(i)
    train_s += tm.s
    losses.append(loss.item())
    if i + 1 in eval_at:
        net = ema.module if ema is not None else model
        point = {"step": i + 1, "train_s": train_s, "loss_last50": sum(losses[-50:]) / len(losses[-50:])}
        for s_ in sorted({1.0, max(float(v) for v in args.cfg.split(","))}):
            point[f"cfg{s_:g}"] = evaluate(net, s_)
        curve.append(point)
        print(point, flush=True)
        model.train()
res = {
    "args": vars(args),
    "train_s": train_s,
    "curve": curve,
    "loss_first50": sum(losses[:50]) / 50,
    "loss_last10pct": sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses) // 10),
}


@torch.no_grad()
def cond_vs_null(m) -> dict[str, float]:
    """Loss of one fixed batch (fixed t and noise) with the true labels and with the null label."""
    m.eval()
    x, y = x_all[:256], y_all[:256]
    out = {}
    for name, yy in (("cond", y), ("null", torch.full_like(y, 4))):
        gg = torch.Generator().manual_seed(1)
        out[name] = diffusion.loss(m, x, yy, generator=gg).item()
    return out


nets = {"raw": model, **({"ema": ema.module} if ema is not None else {})}
for name, net in nets.items():
    net.eval()
    res[f"{name}_loss_cond_vs_null"] = cond_vs_null(net)
    for s in [float(v) for v in args.cfg.split(",")]:
        res[f"{name}_cfg{s:g}"] = evaluate(
            net, s, grid=name == "ema" and s == max(float(v) for v in args.cfg.split(","))
        )
dump(args.out, res)
