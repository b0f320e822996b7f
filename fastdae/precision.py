"""The precision policy: which autocast a forward pass runs under, for a device and the config's
`precision` ("auto" | "fp32" | "bf16" | "fp16"). One function, used by the trainer and the sampler.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for "auto"/"bf16"; CPU runs fp32 unless "bf16" is asked for explicitly;
    "fp16" (CUDA only, checked in the config) pairs with the Updater's GradScaler."""
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
