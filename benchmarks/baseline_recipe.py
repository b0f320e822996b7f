"""The baseline of benchmarks/bench_e2e.py: fastdae's DAE recipe assembled "the common way", from the
same fastdae.models building blocks, hyper-parameters (read from the same parsed config), losses
(fastdae.models.losses.AutoencoderLoss) and data, with these swaps:
  - no latent cache: the frozen stage-1 encoder + quantizer re-run on every stage-2 and prior step (as
    DiT's and LDM's trainers call `vae.encode(x)` each step); the prior's per-channel latent statistics
    come from its first batch (LDM's scale_by_std);
  - taming-transformers' VectorQuantizer (TamingQuantizer: the full N x K distance matrix by matmul,
    argmin, an (N, K) one-hot matrix, z_q = one-hot @ codebook);
  - the lpips package's head formula on the same VGG16 trunk (bench_lpips.public_lpips_head; the
    package itself cannot be imported here: it imports torchvision);
  - the reference attention in the DiT (`attn_impl="ref"`: plain matmul-softmax).
Same steps, batch sizes, models, image size and dataset; EMA, gradient clipping, the end-of-stage
reconstruction eval on the first 256 images and a checkpoint at the end of each stage as fastdae does.
The GAN is on only when the config turns it on (disc.weight > 0), as in fastdae. Its "cache" stage is
empty (0 s).

    run_common_way(config dict) -> {"wall": seconds per stage, "loop": training-loop seconds, "final": ...}
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from bench_lpips import public_lpips_head  # benchmarks/bench_lpips.py (benchmarks/ is on sys.path)
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fastdae.config import TrainConfig
from fastdae.data import build_dataset
from fastdae.models.autoencoder import build_decoder, build_encoder
from fastdae.models.diffusion import LatentScaler, make_diffusion
from fastdae.models.dit import DiT_models
from fastdae.models.losses import AutoencoderLoss

EVAL_IMAGES, EVAL_BATCH = 256, 64  # fastdae's end-of-stage reconstruction eval: the first 256 items


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
        # no discriminator when the config turns the GAN off (disc.weight 0, as the vq preset does)
        disc = self.crit.discriminator
        self.d_params = list(disc.parameters()) if disc is not None else []
        self.d_opt = torch.optim.Adam(self.d_params, lr=s.disc.lr, betas=tuple(s.betas)) if disc is not None else None

    def __call__(self, x: Tensor, x_hat: Tensor, aux: Tensor | float, step: int, last_layer: Tensor) -> Tensor:
        loss, _ = self.crit.generator_loss(x, x_hat, aux, step, last_layer)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.s.grad_clip)
        self.opt.step()
        if self.crit.gan_active(step) and self.d_opt is not None:
            d_loss = self.crit.discriminator_loss(x, x_hat)
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.d_params, self.s.grad_clip)
            self.d_opt.step()
        return loss.detach()

    def state(self) -> dict[str, Any]:
        if self.d_opt is None:
            return {"opt": self.opt.state_dict()}
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
