"""The latent cache's payoff in stage 2, and the cache's own I/O.

    pytest benchmarks/bench_train.py --benchmark-only

Groups:
  stage2-step    one stage-2 decoder update fed from the cache (fastdae) vs with the frozen encoder
                 run on every step (what a trainer without the cache does, e.g. DiT's per-step
                 `vae.encode(x)`). extra_info of the cache member: t_enc, t_dec (medians of interleaved
                 runs), the ideal speed-up (t_enc + t_dec) / t_dec, the measured one, and
                 efficiency = measured / ideal (target >= 0.95).
  stage2-loader  N steps pulling (latents, images) from the cache's prefetching loader: extra_info
                 loader_wait_fraction = time blocked in next(batch) / step time (target < 2 %).
  cache-write    LatentCache.build with the frozen encoder, latents/s.
  cache-read     a full pass over the cache: fastdae's batched memmap loader vs a torch DataLoader
                 over per-item reads (the usual Dataset pattern), latents/s.
  optimizer-step one Adam update of the prior's DiT: torch's per-parameter loop, foreach, fused (the
                 `fused` training option).
GPU: a VQGAN-f8-like model (AE-S/8) at 128x128, batch 32. CPU: the default preset's model at 32x32,
batch 16 (runs in a couple of minutes on 2 cores).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from conftest import HAS_CUDA, stat_s  # benchmarks/conftest.py (pytest puts its folder on sys.path)
from torch.utils.data import DataLoader

from fastdae.cache import LatentCache
from fastdae.data import ProceduralShapes, dataset_fingerprint
from fastdae.models.autoencoder import Autoencoder, autoencoder_config, build_decoder
from fastdae.precision import autocast
from fastdae.training.autoencoding import images_at
from fastdae.training.distributed import cache_batches, to_device

if HAS_CUDA:
    AE, SIZE, BATCH, NUM_IMAGES = autoencoder_config("AE-S/8", num_codes=1024), 128, 32, 2048
else:
    AE, SIZE, BATCH, NUM_IMAGES = autoencoder_config("AE-T/4", ch=16, num_codes=128), 32, 16, 512
LOADER_STEPS = 40 if HAS_CUDA else 20
TIMING_ROUNDS = 15 if HAS_CUDA else 7


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def setup(bench_device, tmp_path_factory):
    """Frozen encoder + bottleneck, a fresh full decoder with Adam, the dataset and its cache."""
    torch.manual_seed(0)
    device = bench_device
    model = Autoencoder(AE, build_decoder(AE)).to(device)
    encoder, bottleneck = model.encoder.eval().requires_grad_(False), model.bottleneck.eval().requires_grad_(False)
    decoder = model.decoder.train()
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-4)
    dataset = ProceduralShapes(NUM_IMAGES, SIZE, seed=0)
    ctx = autocast(device, "auto")

    def encode(images):
        with torch.no_grad(), ctx:
            h = encoder(images.to(device))
        fields, latent = bottleneck.encode_fields(h.float())
        return {k: v.cpu() for k, v in fields.items()}, latent.cpu()

    root = tmp_path_factory.mktemp("cache")
    cache = LatentCache.build(
        root,
        dataset,
        encode,
        batch_size=256,
        shard_size=256,
        encoder_sha256="bench",
        dataset_fingerprint=dataset_fingerprint(dataset),
        progress=False,
    )
    return {
        "device": device,
        "encoder": encoder,
        "bottleneck": bottleneck,
        "decoder": decoder,
        "opt": opt,
        "dataset": dataset,
        "cache": cache,
        "encode": encode,
        "root": root,
    }


def decoder_step(s, z: torch.Tensor, x: torch.Tensor) -> None:
    with autocast(s["device"], "auto"):
        loss = (s["decoder"](z) - x).abs().mean()
    s["opt"].zero_grad(set_to_none=True)
    loss.backward()
    s["opt"].step()


def from_cache(s, fields, x) -> None:
    with torch.no_grad():
        z = s["bottleneck"].latent(fields)
    decoder_step(s, z, x)


def with_encoder(s, fields, x) -> None:
    with torch.no_grad(), autocast(s["device"], "auto"):
        h = s["encoder"](x)
    z, _ = s["bottleneck"](h.float())
    decoder_step(s, z.detach(), x)


def encoder_only(s, x) -> None:
    with torch.no_grad(), autocast(s["device"], "auto"):
        s["encoder"](x)


def fixed_batch(s):
    idx = list(range(BATCH))
    return to_device(s["cache"].gather(idx), s["device"]), images_at(s["dataset"], idx).to(s["device"])


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


@pytest.mark.parametrize("variant", ["fastdae-cache", "encoder-every-step"])
def test_stage2_step(benchmark, record, setup, variant):
    s = setup
    fields, x = fixed_batch(s)
    step = from_cache if variant == "fastdae-cache" else with_encoder
    extra = {"variant": variant, "batch": BATCH, "image_size": SIZE}
    if variant == "fastdae-cache":
        # t_enc, t_dec and both steps interleaved round by round, so machine load hits them alike
        t_enc, t_dec, t_full = [], [], []
        for _ in range(2):  # warm-up
            from_cache(s, fields, x), with_encoder(s, fields, x)
        for _ in range(TIMING_ROUNDS):
            t_enc.append(timed(lambda: encoder_only(s, x), s["device"]))
            t_dec.append(timed(lambda: from_cache(s, fields, x), s["device"]))
            t_full.append(timed(lambda: with_encoder(s, fields, x), s["device"]))
        enc, dec, full = (statistics.median(t) for t in (t_enc, t_dec, t_full))
        ideal, measured = (enc + dec) / dec, full / dec
        extra |= {
            "t_enc_s": enc,
            "t_dec_s": dec,
            "t_encoder_every_step_s": full,
            "ideal_speedup": ideal,
            "measured_speedup": measured,
            "efficiency_vs_ideal": measured / ideal,
        }
    record(**extra)
    benchmark.group = f"stage2-step-{SIZE}px-B{BATCH}"
    benchmark.pedantic(lambda: (step(s, fields, x), sync(s["device"])), rounds=TIMING_ROUNDS, warmup_rounds=1)


def test_stage2_loader_wait(benchmark, record, setup):
    s = setup
    loader = s["cache"].paired_loader(s["dataset"], BATCH, seed=0, num_workers=1, pin_memory=HAS_CUDA)
    waits, totals = [], []

    def run() -> None:
        batches = cache_batches(loader, 0)
        wait = 0.0
        t0 = time.perf_counter()
        for _ in range(LOADER_STEPS):
            t = time.perf_counter()
            fields, x = to_device(next(batches), s["device"])
            wait += time.perf_counter() - t
            from_cache(s, fields, x)
        sync(s["device"])
        waits.append(wait)
        totals.append(time.perf_counter() - t0)

    benchmark.group = f"stage2-loader-{SIZE}px-B{BATCH}"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    fraction = statistics.median(w / t for w, t in zip(waits, totals, strict=True))
    record(steps=LOADER_STEPS, batch=BATCH, loader_wait_fraction=fraction)


def test_cache_write(benchmark, record, setup, tmp_path):
    s = setup
    runs = iter(range(100))

    def build() -> None:
        root = tmp_path / f"c{next(runs)}"
        LatentCache.build(
            root,
            s["dataset"],
            s["encode"],
            batch_size=256,
            shard_size=256,
            encoder_sha256="bench",
            dataset_fingerprint="bench",
            progress=False,
        )

    benchmark.group = f"cache-write-{SIZE}px"
    benchmark.pedantic(build, rounds=2, warmup_rounds=0)
    record(latents=NUM_IMAGES, latents_per_s=NUM_IMAGES / stat_s(benchmark))


def _per_item_pass(cache: LatentCache) -> None:
    for _ in DataLoader(cache, batch_size=256, shuffle=True, num_workers=0):
        pass


@pytest.mark.parametrize("reader", ["fastdae-loader", "dataloader-per-item"])
def test_cache_read(benchmark, record, setup, reader):
    cache = LatentCache(setup["root"], verify="lazy")
    if reader == "fastdae-loader":
        loader = cache.loader(256, seed=0, num_workers=1, drop_last=False)

        def read():
            return [None for _ in loader]
    else:

        def read():
            return _per_item_pass(cache)

    benchmark.group = f"cache-read-{SIZE}px"
    benchmark.pedantic(read, rounds=5, warmup_rounds=1)
    record(reader=reader, latents=len(cache), latents_per_s=len(cache) / stat_s(benchmark))


OPTIMIZER_KERNELS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@pytest.mark.parametrize("kernel", list(OPTIMIZER_KERNELS))
def test_optimizer_step(benchmark, record, bench_device, kernel):
    """One Adam update of the prior's DiT (the default preset's DiT-T/2 on 8x8 latents; DiT-B/2 on
    32x32 on a GPU) with fixed gradients: torch's per-parameter loop (its CPU default), its foreach
    path (its CUDA default) and the fused kernel (the `fused: true` training option)."""
    from fastdae.models.dit import DiT_models

    name, size = ("DiT-B/2", 32) if HAS_CUDA else ("DiT-T/2", 8)
    torch.manual_seed(0)
    model = DiT_models[name](input_size=size, in_channels=4, num_classes=10).to(bench_device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **OPTIMIZER_KERNELS[kernel])
    record(
        kernel=kernel,
        model=name,
        params=sum(p.numel() for p in model.parameters()),
        tensors=len(list(model.parameters())),
    )
    benchmark.group = f"optimizer-step-{name}"
    benchmark.pedantic(lambda: (opt.step(), sync(bench_device)), rounds=100, warmup_rounds=5)
