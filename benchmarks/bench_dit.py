"""DiT training-step throughput (latents/s): the same model with fastdae attention vs SDPA vs the
reference, one AdamW step on the DDPM loss (learned sigma), in one run.

    pytest benchmarks/bench_dit.py --benchmark-only

Groups are `dit-train-<model>-<latent>-B<batch>`; compare members within a group.
GPU: bf16 autocast; DiT-B/2 on 4x32x32 latents (256 tokens, head dim 64) and an XL-width model
(hidden 1152, 16 heads: head dim 72) with depth 6 on the same latents.
CPU: DiT-T/2 on 4x8x8 latents, one intra-op thread (a tiny model on a shared CPU: extra threads
only add contention noise); fastdae's "auto" is SDPA there (its CPU fallback).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import HAS_CUDA

from fastdae.models.diffusion import make_diffusion
from fastdae.models.dit import DiT, DiT_models

# (name, model factory, latent (C, h, w), batch)
if HAS_CUDA:
    CASES = [
        ("DiT-B2", lambda **kw: DiT_models["DiT-B/2"](**kw), (4, 32, 32), 64),
        (
            "DiT-XLwidth-d6",
            lambda **kw: DiT(patch_size=2, hidden_size=1152, depth=6, num_heads=16, **kw),
            (4, 32, 32),
            64,
        ),
    ]
else:
    CASES = [("DiT-T2", lambda **kw: DiT_models["DiT-T/2"](**kw), (4, 8, 8), 16)]
MEMBERS = {"fastdae": "auto", "sdpa": "sdpa", "reference": "ref"}


@pytest.fixture(autouse=True)
def _cpu_threads():
    threads = torch.get_num_threads()
    if not HAS_CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("member", list(MEMBERS))
@pytest.mark.parametrize("name, factory, latent, batch", CASES, ids=[c[0] for c in CASES])
def test_dit_train_step(benchmark, timed, bench_device, name, factory, latent, batch, member):
    C, h, w = latent
    benchmark.group = f"dit-train-{name}-{C}x{h}x{w}-B{batch}"
    torch.manual_seed(0)
    model = factory(input_size=h, in_channels=C, num_classes=10, learn_sigma=True, attn_impl=MEMBERS[member])
    model = model.to(bench_device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = make_diffusion("ddpm")
    x0 = torch.randn(batch, C, h, w, device=bench_device)
    y = torch.randint(0, 10, (batch,), device=bench_device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if HAS_CUDA else contextlib.nullcontext()

    def step():
        with autocast:
            loss = diffusion.loss(model, x0, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: Triton compile + autotune
    seconds = timed(
        step,
        member=member,
        model=name,
        intra_op_threads=torch.get_num_threads(),
        batch=batch,
        latent=list(latent),
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
    )
    benchmark.extra_info["latents_per_s"] = batch / seconds
