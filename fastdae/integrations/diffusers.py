"""A diffusers attention processor that runs the core attention with `fastdae.attention`.

    from fastdae.integrations import FastDAEAttnProcessor
    unet.set_attn_processor(FastDAEAttnProcessor())                  # models with AttentionMixin
    for m in dit.modules():                                          # e.g. DiTTransformer2DModel
        if hasattr(m, "set_processor"):
            m.set_processor(FastDAEAttnProcessor())

It does what diffusers' `AttnProcessor2_0` does around the attention (spatial/group norm, q/k
norms, cross-attention inputs, output projection, residual, rescale) and replaces only
softmax(q k^T * scale) v. diffusers is never imported here: the processor only reads attributes of
the `attn` module it is called with.

Two differences from AttnProcessor2_0, both deliberate:
  * with an `attention_mask`, fastdae.attention (no mask argument) cannot be used, so that call runs
    torch's scaled_dot_product_attention instead, with a warning saying so;
  * `attn.scale` is honoured (AttnProcessor2_0 ignores it and always uses head_dim**-0.5). The two
    agree for every model built with the default `scale_qk=True`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from fastdae.kernels.attention import attention

MASK_FALLBACK_REASON = (
    "FastDAEAttnProcessor: an attention_mask was given and fastdae.attention takes no mask; "
    "this call uses torch.nn.functional.scaled_dot_product_attention instead"
)


class FastDAEAttnProcessor:
    """diffusers attention processor (AttnProcessor2_0's call signature) over fastdae.attention.

    impl: passed to fastdae.attention: "auto" (the Triton kernel for CUDA tensors, torch's SDPA on
    CPU, where the processor brings no speed), "triton", "ref", "sdpa" or "xformers".
    """

    def __init__(self, impl: str = "auto") -> None:
        self.impl = impl

    def __call__(
        self,
        attn: Any,  # diffusers.models.attention_processor.Attention
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) feature map -> (B, H*W, C) tokens
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, kv_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])  # (B, H, 1|N, M)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, N, H*D)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, M, H*D)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, D)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, M, D)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            out = attention(query, key, value, scale=attn.scale, impl=self.impl)  # (B, H, N, D)
        else:
            warnings.warn(MASK_FALLBACK_REASON, stacklevel=2)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, N, H*D)
        out = attn.to_out[0](out)  # output projection
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
