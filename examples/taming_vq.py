"""Swap taming-transformers' VectorQuantizer2 for fastdae's fused one, in a model that already has it.

    python examples/taming_vq.py

    from fastdae.integrations.taming import VectorQuantizer2, patch_vq
    quantize = VectorQuantizer2(n_e, e_dim, beta=0.25)   # taming's constructor, defaults and state dict
    patch_vq(model)                                      # or swap every taming quantizer in place

Same forward, return tuple (z_q, loss, (perplexity, min_encodings, indices)), get_codebook_entry,
`embedding.weight` and legacy loss convention as taming's; the nearest-code search runs fused
(Triton on CUDA, C++ on CPU) without taming's (N, K) distance matrix. Needs taming-transformers
(`pip install --no-deps taming-transformers-rom1504==0.0.6`); prints "skipped" without it.
"""

import copy

import torch
from torch import nn

from fastdae.integrations.taming import VectorQuantizer2, patch_vq


def main() -> None:
    try:
        from taming.modules.vqvae.quantize import VectorQuantizer2 as TamingVQ
    except ImportError as e:
        print(f"skipped: taming-transformers is not installed ({e})")
        return
    torch.manual_seed(0)
    # a VQGAN-like bottleneck: 1x1 conv -> taming quantizer (as VQModel builds it) -> 1x1 conv
    theirs = nn.ModuleDict(
        {
            "quant_conv": nn.Conv2d(16, 8, 1),
            "quantize": TamingVQ(256, 8, beta=0.25),
            "post_quant_conv": nn.Conv2d(8, 16, 1),
        }
    )
    h = torch.randn(4, 16, 16, 16)  # (B, C, H, W) encoder features
    with torch.no_grad():  # codes on the data, as after training (taming's init is U(-1/K, 1/K))
        z_e = theirs["quant_conv"](h).permute(0, 2, 3, 1).reshape(-1, 8)  # (B*H*W, 8)
        theirs["quantize"].embedding.weight.copy_(z_e[torch.randperm(len(z_e))[:256]])
    ours = patch_vq(copy.deepcopy(theirs))  # the swap; the codebook and every other weight are kept
    assert isinstance(ours["quantize"], VectorQuantizer2)
    assert ours.state_dict().keys() == theirs.state_dict().keys()  # checkpoints load either way

    results = []
    for model in (theirs, ours):
        model.zero_grad()
        quant, emb_loss, (_, _, indices) = model["quantize"](model["quant_conv"](h))  # taming's VQModel.encode
        dec = model["post_quant_conv"](quant)
        (dec.square().mean() + emb_loss).backward()
        results.append((indices, emb_loss, dec, model["quantize"].embedding.weight.grad))
    (i_t, l_t, d_t, g_t), (i_o, l_o, d_o, g_o) = results
    print(
        f"codes used {len(i_t.unique())}; indices equal: {torch.equal(i_o, i_t)}; "
        f"loss {l_o.item():.6f} vs {l_t.item():.6f}"
    )
    print(
        f"max |output diff| {(d_o - d_t).abs().max().item():.1e}; "
        f"max |codebook grad diff| {(g_o - g_t).abs().max().item():.1e}"
    )
    assert torch.equal(i_o, i_t) and torch.allclose(l_o, l_t, rtol=1e-5)
    assert torch.allclose(d_o, d_t, atol=1e-6) and torch.allclose(g_o, g_t, rtol=1e-4, atol=1e-9)
    print("ok: same codes, loss, outputs and codebook gradients as taming's VectorQuantizer2")


if __name__ == "__main__":
    main()
