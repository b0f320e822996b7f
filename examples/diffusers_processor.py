"""Run a diffusers model's attention through fastdae with an attention processor.

    pip install diffusers        # no torch dependency of its own
    python examples/diffusers_processor.py

Builds a tiny randomly initialised UNet2DConditionModel (self- and cross-attention; nothing is
downloaded), swaps every processor for FastDAEAttnProcessor and checks the output is unchanged.
"""

import importlib.util
import sys

import torch

from fastdae.integrations import FastDAEAttnProcessor


def main() -> None:
    if importlib.util.find_spec("diffusers") is None:
        print("skipped: diffusers is not installed (pip install diffusers)")
        sys.exit(0)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=32,
    ).eval()
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)  # (B, C, h, w) latents, (B, tokens, dim) context

    with torch.no_grad():
        before = unet(latents, 10, encoder_hidden_states=text).sample
        unet.set_attn_processor(FastDAEAttnProcessor())  # the one-line swap
        after = unet(latents, 10, encoder_hidden_states=text).sample

    n = sum(isinstance(p, FastDAEAttnProcessor) for p in unet.attn_processors.values())
    print(f"{n} attention layers now run fastdae.attention")
    print(f"max |output difference| {(after - before).abs().max().item():.2e}")
    assert torch.allclose(after, before, atol=1e-5)
    print("ok: outputs match the default AttnProcessor2_0")


if __name__ == "__main__":
    main()
