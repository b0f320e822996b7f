"""The whole DAE recipe end to end (issue 14 §5): fastdae vs the same recipe assembled the common way.

    pytest benchmarks/bench_e2e.py --benchmark-only --benchmark-json=benchmarks/results/<device>-e2e-<date>.json
    python benchmarks/bench_e2e.py <that json> > benchmarks/results/<device>-e2e-<date>.md

Members of the one group `e2e-recipe-<size>px`, each one run of stage 1 + cache + stage 2 + prior
(no sampling), rounds interleaved (r0 fastdae, r0 common-way, r1 common-way, r1 fastdae, ...) so
machine load hits both alike:
  fastdae     `fastdae.train(config)`, one public call with stages [stage1, cache, stage2, prior];
              the per-stage split is the wall_s of each stage in the returned Result's metrics.
  common-way  the same recipe written here the usual way, from the same fastdae.models building
              blocks, hyper-parameters (read from the same parsed config), losses
              (fastdae.models.losses.AutoencoderLoss) and data, with these swaps:
                - no latent cache: the frozen stage-1 encoder + quantizer re-run on every stage-2
                  and prior step (as DiT's and LDM's trainers call `vae.encode(x)` each step); the
                  prior's per-channel latent statistics come from its first batch (LDM's scale_by_std);
                - taming-transformers' VectorQuantizer (TamingQuantizer below: the full N x K
                  distance matrix by matmul, argmin, an (N, K) one-hot matrix, z_q = one-hot @ codebook);
                - the lpips package's head formula on the same VGG16 trunk (bench_lpips.public_lpips_head;
                  the package itself cannot be imported here: it imports torchvision);
                - the reference attention in the DiT (`attn_impl="ref"`: plain matmul-softmax).
              Same steps, batch sizes, models, image size and dataset; EMA, gradient clipping, the
              end-of-stage reconstruction eval on the first 256 images and a checkpoint at the end of
              each stage as fastdae does. Its "cache" stage is empty (0 s).
extra_info: total and per-stage seconds (stage1, cache, stage2, prior, other = setup outside the
stages), per-step loop times, the recipe's sizes and the 1-minute load average before and after.
The ratio is common-way / fastdae total wall time, per round and its median. A warm-up run of both
at quick size comes first (imports, loading the C++ ops): one-time process costs are not measured.
CPU: both members run with one intra-op thread (CPU_THREADS: why there).

The recipe is preset "vq" (the README's main job until 2026-12-02, when the default took a KL
bottleneck: 32 px shapes, AE ch 16 f=4 VQ-128, DiT-T/2, batch 16/16/32; the common way's quantizer
needs the VQ) scaled down 16x in steps and dataset size, so every stage sees as many epochs as in
the main job (stage 2: 1.6, prior: 3.9), with LPIPS on (random VGG16 init: there are no weights here,
and a random trunk costs what a trained one does). The preset has no LPIPS weights and runs
without it. GPU: the same recipe (not measured: no GPU was available).
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from bench_lpips import public_lpips_head  # benchmarks/bench_lpips.py (pytest puts its folder on sys.path)
from torch import Tensor, nn
from torch.utils.data import DataLoader

import fastdae
from fastdae.config import TrainConfig, preset
from fastdae.data import build_dataset
from fastdae.models.autoencoder import build_decoder, build_encoder
from fastdae.models.diffusion import LatentScaler, make_diffusion
from fastdae.models.dit import DiT_models
from fastdae.models.losses import AutoencoderLoss

STAGES = ("stage1", "cache", "stage2", "prior")
VARIANTS = ("fastdae", "common-way")
# FASTDAE_BENCH_QUICK=1: the tiny preset at 2 steps a stage, one round (tests/benchmarks/test_bench_e2e.py runs
# this file so with --benchmark-disable: the benchmark and its correctness checks, not a measurement)
QUICK = os.environ.get("FASTDAE_BENCH_QUICK") == "1"
ROUNDS = 1 if QUICK else 3
# CPU: one intra-op thread for both members. On the shared 2-core machine two threads under load made
# a DiT-T/2 training step 80x slower (7.4 s vs 93 ms median, 2026-12-01): barrier waits, not work.
CPU_THREADS = 1
EVAL_IMAGES, EVAL_BATCH = 256, 64  # fastdae's end-of-stage reconstruction eval: the first 256 items


def recipe(out_dir: str | Path, quick: bool = QUICK) -> dict[str, Any]:
    """The config dict both members run: the vq preset / 16 in steps and data (see the module
    docstring); quick: the tiny preset at 2 steps a stage (tests)."""
    if quick:
        disc = {"ndf": 8, "n_layers": 1, "start": 1}
        steps = {"stage1": 2, "stage2": 2, "prior": 2}
        base, data = "tiny", {"num_samples": 64}
    else:
        disc = {"ndf": 16, "n_layers": 2, "start": 12}  # the preset's start 200, / 16
        steps = {"stage1": 25, "stage2": 25, "prior": 31}  # the preset's 400 / 400 / 500, / 16
        base, data = "vq", {"num_samples": 256}  # 4096 / 16
    once = {
        name: {"steps": n, "log_every": n, "ckpt_every": n} for name, n in steps.items()
    }  # one checkpoint, at the end
    lpips = {"lpips_random_init": True, "lpips_weight": 1.0, "disc": disc}
    return TrainConfig.from_dict(
        {
            "out_dir": str(out_dir),
            "stages": list(STAGES),
            "progress": False,
            "data": data,
            "stage1": {**once["stage1"], **lpips},
            "stage2": {**once["stage2"], **lpips},
            "prior": once["prior"],
        },
        base=preset(base),
    ).to_dict()


# ---------------------------------------------------------------------------------------------
# The swapped-in common ops
# ---------------------------------------------------------------------------------------------
class TamingQuantizer(nn.Module):
    """taming-transformers' VectorQuantizer (taming/modules/vqvae/quantize.py) as it computes:
    d = ||z||^2 + ||e||^2 - 2 z e^T over all (N, K) pairs, argmin, an (N, K) one-hot matrix,
    z_q = one-hot @ codebook, perplexity of the one-hot column means. The loss puts beta on the
    commitment term as fastdae and taming's VectorQuantizer2(legacy=False) do (VectorQuantizer has it
    on the codebook term, a bug taming documents; the cost is the same)."""

    def __init__(self, num_codes: int, dim: int, beta: float) -> None:
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.embedding = nn.Embedding(num_codes, dim)
        self.embedding.weight.data.uniform_(-1.0 / num_codes, 1.0 / num_codes)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """z (B, D, H, W) -> z_q (B, D, H, W) (straight-through), loss, (perplexity, one-hot (N, K), indices (N, 1))."""
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, H, W, D)
        flat = z.view(-1, self.dim)  # (N, D)
        e = self.embedding.weight  # (K, D)
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * torch.matmul(flat, e.t())  # (N, K)
        idx = d.argmin(dim=1).unsqueeze(1)  # (N, 1)
        one_hot = torch.zeros(idx.shape[0], self.num_codes, device=z.device, dtype=z.dtype).scatter_(1, idx, 1)
        z_q = torch.matmul(one_hot, e).view(z.shape)  # (B, H, W, D)
        loss = torch.mean((z_q - z.detach()) ** 2) + self.beta * torch.mean((z_q.detach() - z) ** 2)
        z_q = z + (z_q - z).detach()
        e_mean = one_hot.mean(dim=0)
        perplexity = torch.exp(-torch.sum(e_mean * torch.log(e_mean + 1e-10)))
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (perplexity, one_hot, idx)


class PackageHeadLPIPS(nn.Module):
    """fastdae's LPIPS trunk (same VGG16, same lin weights) with the lpips package's head formula."""

    def __init__(self, lpips: nn.Module) -> None:
        super().__init__()
        self.lpips = lpips

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        """(B,) distances; as lpips.LPIPS.forward, both branches run with autograd on."""
        return public_lpips_head(self.lpips.features(x0), self.lpips.features(x1), self.lpips.lin_weights)


# ---------------------------------------------------------------------------------------------
# The common-way recipe
# ---------------------------------------------------------------------------------------------
class EMA:
    """Decoder/DiT weight averaging with the usual warm-up decay min(decay, (1 + t) / (10 + t))."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay, self.source = decay, module
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.module.parameters()), list(self.source.parameters()), 1.0 - d)


def endless(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


def image_loader(dataset: Any, batch: int, workers: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled (images (B, 3, H, W), labels (B,)) batches forever (the dataset renders a batch at once)."""
    return endless(
        DataLoader(
            dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0
        )
    )


def timed_loop(steps: int, batches: Iterator[Any], step: Callable[[Any, int], Tensor]) -> tuple[float, float]:
    """Runs step(batch, i) for i < steps; (loop seconds, last loss)."""
    t0 = time.perf_counter()
    loss = torch.zeros(())
    for i in range(steps):
        loss = step(next(batches), i)
    return time.perf_counter() - t0, float(loss)


class AEUpdate:
    """One generator step (AutoencoderLoss, Adam, clip) and, once the GAN is on, one discriminator step."""

    def __init__(self, s: Any, params: list[Tensor], device: torch.device) -> None:
        self.s, self.params = s, params
        self.crit = AutoencoderLoss(s, device)
        self.crit.lpips = PackageHeadLPIPS(self.crit.lpips)
        self.opt = torch.optim.Adam(params, lr=s.lr, betas=tuple(s.betas))
        self.d_params = list(self.crit.discriminator.parameters())
        self.d_opt = torch.optim.Adam(self.d_params, lr=s.disc.lr, betas=tuple(s.betas))

    def __call__(self, x: Tensor, x_hat: Tensor, aux: Tensor | float, step: int, last_layer: Tensor) -> Tensor:
        loss, _ = self.crit.generator_loss(x, x_hat, aux, step, last_layer)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.s.grad_clip)
        self.opt.step()
        if self.crit.gan_active(step):
            d_loss = self.crit.discriminator_loss(x, x_hat)
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.d_params, self.s.grad_clip)
            self.d_opt.step()
        return loss.detach()

    def state(self) -> dict[str, Any]:
        return {
            "opt": self.opt.state_dict(),
            "d_opt": self.d_opt.state_dict(),
            "discriminator": self.crit.discriminator.state_dict(),
        }


@torch.no_grad()
def reconstruct_psnr(dataset: Any, reconstruct: Callable[[Tensor], Tensor], device: torch.device) -> float:
    """PSNR (images in [-1, 1]) over the first EVAL_IMAGES items, as fastdae's end-of-stage eval."""
    se = count = 0.0
    for a in range(0, min(EVAL_IMAGES, len(dataset)), EVAL_BATCH):
        x = torch.stack([dataset[i][0] for i in range(a, min(a + EVAL_BATCH, EVAL_IMAGES, len(dataset)))]).to(device)
        se += (reconstruct(x).clamp(-1, 1) - x).square().sum().item()
        count += x.numel()
    return 10 * math.log10(4.0 / max(se / count, 1e-12))


def run_common_way(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe assembled the common way (module docstring); per-stage seconds and loop seconds."""
    cfg = TrainConfig.from_dict(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the recipe's device "auto"
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ae, dataset = cfg.autoencoder, build_dataset(cfg.data)
    workers = max(1, cfg.num_workers)  # what fastdae's cache loaders use in stage 2 and the prior
    wall: dict[str, float] = {"cache": 0.0}
    loop: dict[str, float] = {}
    final: dict[str, float] = {}

    # stage 1: encoder + taming quantizer + weak decoder
    t = time.perf_counter()
    s1 = cfg.stage1
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(ae).to(device)
    quantizer = TamingQuantizer(ae.num_codes, ae.z_channels, ae.vq_beta).to(device)
    decoder1 = build_decoder(ae, cfg.weak_decoder if cfg.mode == "dae" else None).to(device)
    update1 = AEUpdate(s1, [*encoder.parameters(), *quantizer.parameters(), *decoder1.parameters()], device)
    ema1 = EMA(decoder1, s1.ema_decay)

    def step1(batch: tuple[Tensor, Tensor], i: int) -> Tensor:
        x = batch[0].to(device)
        z_q, vq_loss, _ = quantizer(encoder(x))
        loss = update1(x, decoder1(z_q), vq_loss, i, decoder1.last_layer)
        ema1.update(i)
        return loss

    for m in (encoder, quantizer, decoder1):
        m.train()
    loop["stage1"], final["stage1"] = timed_loop(s1.steps, image_loader(dataset, s1.batch_size, cfg.num_workers), step1)
    for m in (encoder, quantizer):
        m.eval().requires_grad_(False)
    final["stage1_psnr"] = reconstruct_psnr(dataset, lambda x: ema1.module(quantizer(encoder(x))[0]), device)
    torch.save(
        {
            "encoder": encoder.state_dict(),
            "quantizer": quantizer.state_dict(),
            "decoder": ema1.module.state_dict(),
            **update1.state(),
        },
        out / "stage1.pt",
    )
    wall["stage1"] = time.perf_counter() - t

    def encode(x: Tensor) -> Tensor:
        """The frozen encoder + quantizer on a batch: (B, 3, H, W) -> z_q (B, C, h, w)."""
        with torch.no_grad():
            return quantizer(encoder(x))[0]

    # stage 2: a fresh full decoder; the encoder runs on every step
    t = time.perf_counter()
    s2 = cfg.stage2
    torch.manual_seed(cfg.seed + 1)
    decoder2 = build_decoder(ae).to(device).train()
    update2 = AEUpdate(s2, list(decoder2.parameters()), device)
    ema2 = EMA(decoder2, s2.ema_decay)

    def step2(batch: tuple[Tensor, Tensor], i: int) -> Tensor:
        x = batch[0].to(device)
        loss = update2(x, decoder2(encode(x)), 0.0, i, decoder2.last_layer)
        ema2.update(i)
        return loss

    loop["stage2"], final["stage2"] = timed_loop(s2.steps, image_loader(dataset, s2.batch_size, workers), step2)
    final["stage2_psnr"] = reconstruct_psnr(dataset, lambda x: ema2.module(encode(x)), device)
    torch.save({"decoder": ema2.module.state_dict(), **update2.state()}, out / "stage2.pt")
    wall["stage2"] = time.perf_counter() - t

    # prior: DiT with the reference attention on latents encoded every step
    t = time.perf_counter()
    p = cfg.prior
    torch.manual_seed(cfg.seed + 2)
    dit = (
        DiT_models[p.model](
            input_size=cfg.data.size // ae.downsample,
            in_channels=ae.z_channels,
            num_classes=dataset.num_classes if p.class_cond else 0,
            learn_sigma=False,
            attn_impl="ref",
        )
        .to(device)
        .train()
    )
    diffusion = make_diffusion(p.objective, p.schedule, p.num_timesteps)
    opt = torch.optim.Adam(dit.parameters(), lr=p.lr, betas=(0.9, 0.999))
    ema = EMA(dit, p.ema_decay)
    batches = image_loader(dataset, p.batch_size, workers)
    first = next(batches)
    scaler = LatentScaler.from_data(encode(first[0].to(device))).to(device)

    def step_prior(batch: tuple[Tensor, Tensor], i: int) -> Tensor:
        x, y = (b.to(device) for b in batch)
        loss = diffusion.loss(dit, scaler.normalize(encode(x)), y if p.class_cond else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), p.grad_clip)
        opt.step()
        ema.update(i)
        return loss.detach()

    loop["prior"], final["prior"] = timed_loop(p.steps, batches, step_prior)
    torch.save({"dit": ema.module.state_dict(), "opt": opt.state_dict()}, out / "prior.pt")
    wall["prior"] = time.perf_counter() - t
    return {"wall": wall, "loop": loop, "final": final}


def run_fastdae(config: dict[str, Any]) -> dict[str, Any]:
    """One public fastdae.train call; the per-stage split from the Result's metrics."""
    result = fastdae.train(config)
    stages = result.metrics["stages"]
    return {
        "wall": {s: stages[s]["wall_s"] for s in STAGES},
        "loop": {s: stages[s]["time_s"] for s in ("stage1", "stage2", "prior")},
        "final": {
            "stage1_psnr": stages["stage1"]["eval"]["psnr"],
            "stage2_psnr": stages["stage2"]["eval"]["psnr"],
            **{s: stages[s]["final"]["loss"] for s in ("stage1", "stage2", "prior")},
        },
    }


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"fastdae": run_fastdae, "common-way": run_common_way}


def run_recipe(variant: str, config: dict[str, Any]) -> dict[str, Any]:
    """Runs one member; adds the total wall time and `other` (time outside the four stages)."""
    t = time.perf_counter()
    split = RUNNERS[variant](config)
    split["total"] = time.perf_counter() - t
    split["wall"]["other"] = split["total"] - sum(split["wall"][s] for s in STAGES)
    return split


def flat_info(variant: str, split: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """extra_info fields of one run: seconds per stage, ms per loop step, the recipe's sizes."""
    steps = {s: config[s]["steps"] for s in ("stage1", "stage2", "prior")}
    info: dict[str, Any] = {"variant": variant, "total_s": split["total"]}
    info |= {f"{s}_s": v for s, v in split["wall"].items()}
    info |= {f"{s}_loop_ms_per_step": 1e3 * v / steps[s] for s, v in split["loop"].items()}
    info |= {f"final_{k}": v for k, v in split["final"].items()}
    info |= {f"{s}_steps": n for s, n in steps.items()}
    info |= {
        "stage1_batch": config["stage1"]["batch_size"],
        "stage2_batch": config["stage2"]["batch_size"],
        "prior_batch": config["prior"]["batch_size"],
        "image_size": config["data"]["size"],
        "num_samples": config["data"]["num_samples"],
        "dit": config["prior"]["model"],
    }
    return info


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def warmed(threads, tmp_path_factory) -> None:
    """Both members once at quick size before the timed runs: imports, the C++ ops' load, allocator.
    Quick mode's one run is not a measurement: nothing to warm."""
    if QUICK:
        return
    for variant in VARIANTS:
        run_recipe(variant, recipe(tmp_path_factory.mktemp(f"warm-{variant}"), quick=True))


# rounds interleaved, alternating which member goes first
ORDER = [(r, v) for r in range(ROUNDS) for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1])]
_TOTALS: dict[int, dict[str, float]] = {}  # round -> variant -> total seconds, for the round's ratio


@pytest.mark.parametrize("round_,variant", ORDER, ids=[f"r{r}-{v}" for r, v in ORDER])
def test_e2e_recipe(benchmark, record, warmed, tmp_path, round_, variant):
    config = recipe(tmp_path / "run")
    splits: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    benchmark.group = f"e2e-recipe-{config['data']['size']}px"
    benchmark.pedantic(lambda: splits.append(run_recipe(variant, config)), rounds=1, iterations=1, warmup_rounds=0)
    split = splits[0]
    totals = _TOTALS.setdefault(round_, {})
    totals[variant] = split["total"]
    ratio = {"round_ratio_common_over_fastdae": totals["common-way"] / totals["fastdae"]} if len(totals) == 2 else {}
    record(
        round=round_,
        load_avg_1min_before=load_before,
        load_avg_1min_after=os.getloadavg()[0],
        **flat_info(variant, split, config),
        **ratio,
    )
    assert set(split["wall"]) == {*STAGES, "other"} and all(v >= 0 for v in split["wall"].values())
    assert all(math.isfinite(v) for v in split["final"].values()), split["final"]


@pytest.mark.parametrize("component", ["lpips-loss", "frozen-encode"])
def test_e2e_component(benchmark, record, warmed, tmp_path, component):
    """What dominates the recipe's steps on a CPU, at the recipe's shapes: the LPIPS loss both members
    pay in every stage-1/2 step (VGG16 on x_hat and x, backward through x_hat; stage batch), and the
    frozen encoder + quantizer forward the common way adds to every stage-2 and prior step (prior batch)."""
    cfg = TrainConfig.from_dict(recipe(tmp_path))
    torch.manual_seed(0)
    size = cfg.data.size
    if component == "lpips-loss":
        from fastdae.nn import LPIPS

        lpips, batch = LPIPS(random_init=True, check_range=False), cfg.stage1.batch_size
        x, x_hat = torch.rand(2, batch, 3, size, size).mul(2).sub(1).unbind(0)
        x_hat.requires_grad_(True)
        run = lambda: lpips(x_hat, x).mean().backward()
    else:
        ae, batch = cfg.autoencoder, cfg.prior.batch_size
        encoder = build_encoder(ae).eval().requires_grad_(False)
        quantizer = TamingQuantizer(ae.num_codes, ae.z_channels, ae.vq_beta).eval()
        x = torch.rand(batch, 3, size, size).mul(2).sub(1)
        run = torch.no_grad()(lambda: quantizer(encoder(x)))
    benchmark.group = f"e2e-components-{size}px"
    benchmark.pedantic(run, rounds=1 if QUICK else 7, warmup_rounds=1)
    record(component=component, batch=batch, image_size=size)


# ---------------------------------------------------------------------------------------------
# The swapped-in ops compute what they stand for (run with --benchmark-disable; skipped by --benchmark-only)
# ---------------------------------------------------------------------------------------------
def test_taming_quantizer_is_taming_vector_quantizer():
    """Codes, z_q and perplexity equal the installed taming-transformers VectorQuantizer's; the loss and
    its gradients equal fastdae.vector_quantize's (the beta convention both use)."""
    taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")
    torch.manual_seed(0)
    ours = TamingQuantizer(64, 4, 0.25)
    theirs = taming_quantize.VectorQuantizer(64, 4, 0.25)
    theirs.load_state_dict(ours.state_dict())
    ours.embedding.weight.data.normal_()  # spread codes so that many are used
    theirs.embedding.weight.data.copy_(ours.embedding.weight.data)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    z_q, loss, (perplexity, one_hot, idx) = ours(z)
    t_zq, _, (t_perplexity, t_one_hot, t_idx) = theirs(z)
    assert torch.equal(idx, t_idx) and torch.equal(one_hot, t_one_hot)
    torch.testing.assert_close(z_q, t_zq)
    torch.testing.assert_close(perplexity, t_perplexity)

    codebook = ours.embedding.weight.detach().clone().requires_grad_(True)
    z2 = z.detach().clone().requires_grad_(True)
    ref = fastdae.vector_quantize(z2.permute(0, 2, 3, 1), codebook, 0.25)
    torch.testing.assert_close(ref.indices.reshape(-1), idx[:, 0])
    torch.testing.assert_close(loss, ref.loss)
    (z_q.square().sum() + loss).backward()
    (ref.z_q.square().sum() + ref.loss).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(ours.embedding.weight.grad, codebook.grad)


def test_package_head_lpips_is_fastdae_lpips():
    """The lpips package's head on fastdae's trunk gives fastdae's LPIPS distance and input gradient."""
    from fastdae.nn import LPIPS

    torch.manual_seed(0)
    lpips = LPIPS(random_init=True)
    x0, x1 = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    a, b = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    d_ours, d_theirs = lpips(a, x1), PackageHeadLPIPS(lpips)(b, x1)
    torch.testing.assert_close(d_theirs.reshape(-1), d_ours.reshape(-1), rtol=1e-4, atol=1e-6)  # (B,) or (B, 1, 1, 1)
    d_ours.sum().backward()
    d_theirs.sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-7)


def test_common_way_dit_uses_the_reference_attention():
    dit = DiT_models["DiT-T/2"](input_size=8, in_channels=4, num_classes=4, attn_impl="ref")
    assert all(block.attn.impl == "ref" for block in dit.blocks)


# ---------------------------------------------------------------------------------------------
# The report: python benchmarks/bench_e2e.py <pytest-benchmark json>
# ---------------------------------------------------------------------------------------------
def report(path: Path) -> str:
    """Markdown: per-member medians over rounds, the per-round and median wall-clock ratios, the split."""
    data = json.loads(path.read_text())
    runs = [b["extra_info"] for b in data["benchmarks"] if b["name"].startswith("test_e2e_recipe")]
    by = {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["round"]) for v in VARIANTS}
    ratios = [c["total_s"] / f["total_s"] for f, c in zip(by["fastdae"], by["common-way"])]
    med = {
        v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if all(isinstance(r.get(k), float) for r in rs)}
        for v, rs in by.items()
    }  # (the round's ratio is on its second member only)
    first = runs[0]
    loads = [r[k] for r in runs for k in ("load_avg_1min_before", "load_avg_1min_after")]
    title = (
        f"# End-to-end recipe: fastdae vs the common way ({first['device']}, torch {first['torch']}, "
        f"intra-op threads: {first['threads']})"
    )
    sizes = (
        f"Recipe: {first['image_size']} px shapes, {first['num_samples']} images; stage 1 {first['stage1_steps']} "
        f"steps x {first['stage1_batch']}, cache, stage 2 {first['stage2_steps']} x {first['stage2_batch']}, prior "
        f"({first['dit']}) {first['prior_steps']} x {first['prior_batch']}; {len(ratios)} interleaved rounds."
    )
    load = (
        f"1-minute load average during the runs: {min(loads):.1f} to {max(loads):.1f} "
        f"(machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')})."
    )
    headline = (
        f"**Wall-clock ratio common-way / fastdae: {statistics.median(ratios):.2f}x** (median over rounds; "
        f"per round: {', '.join(f'{x:.2f}x' for x in ratios)})."
    )
    lines = [
        title,
        "",
        sizes,
        load,
        "",
        headline,
        "",
        "| stage | fastdae (s) | common way (s) | ratio | fastdae ms/step | common ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for s in (*STAGES, "other", "total"):
        f, c = med["fastdae"][f"{s}_s"], med["common-way"][f"{s}_s"]
        ms = [m.get(f"{s}_loop_ms_per_step") for m in (med["fastdae"], med["common-way"])]
        ms_text = " | ".join(f"{x:.0f}" if x is not None else "" for x in ms)
        ratio = f"{c / f:.2f}x" if c > 0 else "(no cache)"
        lines.append(f"| {s} | {f:.2f} | {c:.2f} | {ratio} | {ms_text} |")
    notes = (
        "Per-member medians over rounds (so the total row's ratio, of medians, can differ from the "
        "headline, the median of per-round ratios); `other` is fastdae.train's setup outside the stages "
        "(config, logging, summary) or the common way's run outside its stages. ms/step: the training "
        "loop alone (no model build, eval or final save), per step."
    )
    lines += ["", notes, "", "| final | fastdae | common way |", "|---|---|---|"]
    for k in ("final_stage1_psnr", "final_stage2_psnr", "final_stage1", "final_stage2", "final_prior"):
        lines.append(f"| {k.removeprefix('final_')} | {med['fastdae'][k]:.3f} | {med['common-way'][k]:.3f} |")
    components = [b for b in data["benchmarks"] if b["name"].startswith("test_e2e_component")]
    lines += ["", "Components at the recipe's shapes (median of rounds, same run):", ""]
    lines += [
        f"- {b['extra_info']['component']} (batch {b['extra_info']['batch']}): {1e3 * b['stats']['median']:.0f} ms"
        for b in components
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(report(Path(sys.argv[1])))
