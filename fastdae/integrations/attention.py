"""Swap the attention of timm ViT-style and facebookresearch/DiT-style models for fastdae's.

    from fastdae.integrations import patch_attention
    model = patch_attention(DiT_models["DiT-XL/2"](...))    # in place; returns the model

A module is patched when it has the structure of timm's `vision_transformer.Attention` (which DiT
imports): a `qkv` Linear(C, 3C), a `proj` Linear(C, C) and an int `num_heads` dividing C. It is
detected by structure, so timm is never imported. Each one is replaced by a `fastdae.nn.Attention`
that holds the module's own `qkv`, `proj`, `q_norm`, `k_norm`, `attn_drop` and `proj_drop`
submodules: the parameters are the same tensors (an optimizer built before patching keeps working),
`scale` and the train/eval mode are copied, and the state dict keeps its keys.

Semantics kept: q/k norms (any module acting on the head dim), attention dropout (nn.Attention runs
torch's SDPA with dropout_p while training with attn_drop > 0), projection bias or not. Refused,
with a ValueError naming the module: parameters or submodules the timm layout does not have
(relative position tables, rotary embeddings, a non-identity timm `norm`), forward arguments beyond
(x, attn_mask), causal flags, and qkv/proj shapes other than (C -> 3C, C -> C). At call time the
patched module accepts timm's `attn_mask=None` and raises on a real mask (fastdae.attention takes none).
Forward hooks registered on the original modules are not carried over.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from fastdae.nn.attention import Attention

# the submodules of timm's Attention; `norm` (timm's scale_norm) must be nn.Identity
KNOWN_CHILDREN = frozenset({"qkv", "proj", "q_norm", "k_norm", "attn_drop", "proj_drop", "norm"})
KNOWN_FORWARD_ARGS = ("self", "x", "attn_mask")


class PatchedAttention(Attention):
    """fastdae.nn.Attention with timm's forward signature: `attn_mask` must be None."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is not None:
            raise ValueError(
                "patched attention: got an attn_mask, but fastdae.attention takes no mask; "
                "leave modules that are called with masks unpatched"
            )
        return super().forward(x)


def _looks_like_attention(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "proj", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
        and not isinstance(module, Attention)
    )


def _unsupported(module: nn.Module) -> list[str]:
    """Why `module` (which looks like timm's Attention) cannot be reproduced; empty when it can."""
    why = []
    dim, heads = module.qkv.in_features, module.num_heads
    if module.qkv.out_features != 3 * dim or (module.proj.in_features, module.proj.out_features) != (dim, dim):
        why.append(
            f"qkv must be Linear({dim}, {3 * dim}) and proj Linear({dim}, {dim}), got "
            f"qkv {module.qkv.in_features}->{module.qkv.out_features}, "
            f"proj {module.proj.in_features}->{module.proj.out_features}"
        )
    if heads <= 0 or dim % heads:
        why.append(f"num_heads={heads} does not divide dim={dim}")
    extra = sorted(set(dict(module.named_children())) - KNOWN_CHILDREN)
    if extra:
        why.append(f"submodules fastdae does not reproduce: {extra}")
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        why.append("a non-identity `norm` after attention (timm scale_norm)")
    own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    if own:
        why.append(f"own parameters/buffers fastdae does not reproduce: {own}")
    args = [a for a in inspect.signature(type(module).forward).parameters if a not in KNOWN_FORWARD_ARGS]
    if args:
        why.append(f"forward arguments beyond (x, attn_mask): {args}")
    if getattr(module, "is_causal", False) or getattr(module, "causal", False):
        why.append("causal attention (fastdae.attention is non-causal)")
    return why


def _replacement(module: nn.Module, impl: str) -> PatchedAttention:
    """A PatchedAttention around `module`'s own submodules (no parameter is copied or re-created)."""
    dim = module.qkv.in_features
    with torch.device("meta"):  # the Linear layers built here are replaced below: allocate nothing
        new = PatchedAttention(dim, module.num_heads, impl=impl)
    new.qkv, new.proj = module.qkv, module.proj
    for name in ("q_norm", "k_norm", "attn_drop", "proj_drop"):
        if hasattr(module, name):
            setattr(new, name, getattr(module, name))
    new.scale = float(module.scale) if hasattr(module, "scale") else new.scale
    return new.train(module.training)


def patch_attention(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Replace every timm/DiT-style Attention in `model` by fastdae's, in place; returns `model`.

    When `model` itself is such a module, the replacement is returned (use the return value).
    impl: the fastdae.attention backend for the patched modules ("auto", "triton", "ref", "sdpa", ...).
    Raises ValueError naming each module that looks like attention but cannot be reproduced, and
    when the model has no such module at all. Patched modules are `fastdae.nn.Attention` instances:
    count them with `sum(isinstance(m, fastdae.nn.Attention) for m in model.modules())`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_attention: model must be an nn.Module, got {type(model).__name__}")
    # remove_duplicate=False: a module reachable under two names is replaced under both
    found = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if _looks_like_attention(m)]
    refused = [(name, type(m).__name__, why) for name, m in found if (why := _unsupported(m))]
    if refused:
        lines = "\n".join(f"  {name or '<model>'} ({cls}): {'; '.join(why)}" for name, cls, why in refused)
        raise ValueError(f"patch_attention: cannot reproduce these attention modules, nothing was patched:\n{lines}")
    if not found:
        raise ValueError(
            "patch_attention: no timm/DiT-style attention module (qkv Linear, proj Linear, num_heads) "
            f"in {type(model).__name__}"
        )
    replacements: dict[int, PatchedAttention] = {}
    for name, module in found:
        if id(module) not in replacements:
            replacements[id(module)] = _replacement(module, impl)
        new = replacements[id(module)]
        if not name:
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model
