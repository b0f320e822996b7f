"""The precision policy: which autocast a forward pass runs under, for a device, the config's
`precision` ("auto" | "fp32" | "bf16" | "fp16") and the stage it runs in. One function, used by the
trainer (Run.autocast) and the sampler.

    CUDA   auto, bf16: bf16 autocast in every stage;  fp16: fp16 autocast (+ the Updater's GradScaler)
    CPU    auto, fp32: fp32 everywhere
           bf16: bf16 autocast in the autoencoder stages only (CPU_BF16_STAGES: stage 1, the cache,
                 stage 2, and the decoder when samples are drawn), fp32 for the DiT prior

Why per stage on a CPU: with AMX-BF16 / AVX-512-BF16 (Intel Xeon, one thread) a stack of four 64-channel
3x3 convolutions at 32 px, batch 16, forward + backward took 113-123 ms under bf16 autocast against
361-395 ms in fp32, while a DiT-T/2 training step got slower (274 -> 363-372 ms): its small matmuls
pay the casts and gain little. The convolutional autoencoder, its discriminator and the frozen LPIPS
trunk are where bf16 pays; the transformer is not. benchmarks/bench_e2e.py measures the whole recipe
and the reconstruction PSNR both ways.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

log = logging.getLogger("fastdae")

# stages whose forward passes are convolutional (autoencoder, discriminator, LPIPS' VGG16): bf16 pays on CPU
CPU_BF16_STAGES = ("stage1", "cache", "stage2")


def resolve(device: torch.device, precision: str, stage: str | None = None) -> str:
    """The precision a forward pass of `stage` runs in: "fp32", "bf16" or "fp16". stage None: a pass
    outside any named stage, treated as an autoencoder stage (e.g. the Sampler's decoder: the stage-2
    decoder turning sampled latents into images); "samples": the Sampler's DiT."""
    if precision == "fp16":
        return "fp16"
    if device.type == "cuda":
        return "bf16" if precision in ("auto", "bf16") else "fp32"
    if precision == "bf16" and (stage is None or stage in CPU_BF16_STAGES):
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str, stage: str | None = None) -> contextlib.AbstractContextManager:
    """The autocast context of `resolve(device, precision, stage)` (nullcontext for fp32)."""
    chosen = resolve(device, precision, stage)
    if chosen != precision and precision == "bf16" and stage is not None:
        _say_once(stage)
    if chosen == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if chosen == "fp16" else torch.bfloat16)


@functools.cache
def _say_once(stage: str) -> None:
    log.info(
        f"precision bf16 on CPU: {stage} runs in fp32 (bf16 autocast only in {', '.join(CPU_BF16_STAGES)}: "
        "the DiT's step was slower in bf16 on CPU)"
    )
