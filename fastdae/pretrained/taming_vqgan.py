"""Bring your own stage 1, taming-transformers flavour: a VQGAN checkpoint (`last.ckpt`, a PyTorch
Lightning checkpoint whose "state_dict" holds encoder.*, quant_conv.*, quantize.embedding.weight,
post_quant_conv.*, decoder.*, loss.*) plus its YAML (`model.params`: ddconfig, n_embed, embed_dim) as
the frozen stage-1 encoder, and a stage-2 decoder in taming's architecture exported back to a checkpoint.

    stage1 = load_taming_stage1("vqgan/last.ckpt", "vqgan/config.yaml")        # FrozenStage1, kind "vq"
    decoder = TamingDecoder.from_source("vqgan/last.ckpt", "vqgan/config.yaml") # fresh weights
    export_taming(decoder, "vqgan/last.ckpt", "vqgan/config.yaml", "vqgan-dae") # last.ckpt + config.yaml

As taming's VQModel: h = quant_conv(encoder(x)) (B, embed_dim, h, w) -> nearest code index (B, h, w)
(fastdae.vector_quantize) -> z_q = codebook[indices]; decode(z_q) = decoder(post_quant_conv(z_q)).
Only VQModel checkpoints (target taming.models.vqgan.VQModel) without `remap`; the exported checkpoint
holds the source's state dict with the decoder side replaced, which taming's
`VQModel(..., ckpt_path=...)` / `init_from_ckpt` loads. taming is imported inside functions only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastdae.pretrained.diffusers_vae import FrozenStage1, encoder_sha256, vq_bottleneck

CKPT_FILE = "last.ckpt"
CONFIG_FILE = "config.yaml"
DECODER_SIDE = ("post_quant_conv.", "decoder.")


def read_taming_config(config: str | os.PathLike) -> dict[str, Any]:
    """`model.params` of a taming VQGAN YAML: {"ddconfig": {...}, "n_embed": K, "embed_dim": D, ...}."""
    import yaml

    doc = yaml.safe_load(Path(config).read_text())
    model = doc.get("model", doc) if isinstance(doc, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict) or not {"ddconfig", "n_embed", "embed_dim"} <= params.keys():
        raise ValueError(f"{config}: expected a taming VQGAN config with model.params.ddconfig, n_embed, embed_dim")
    target = model.get("target", "taming.models.vqgan.VQModel")
    if target != "taming.models.vqgan.VQModel" or params.get("remap") is not None:
        raise ValueError(
            f"{config}: only taming.models.vqgan.VQModel without remap is supported, got {target!r}"
            f"{' with remap' if params.get('remap') is not None else ''}"
        )
    return params


def _state_dict(ckpt: str | os.PathLike) -> dict[str, Tensor]:
    blob = torch.load(str(ckpt), map_location="cpu", weights_only=True)  # tensors and plain containers only
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or "quantize.embedding.weight" not in state:
        raise ValueError(f"{ckpt}: not a taming VQGAN checkpoint (no state_dict with quantize.embedding.weight)")
    return state


def _load_part(module: nn.Module, state: dict[str, Tensor], prefix: str, source: str) -> None:
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(part, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: {prefix}* does not fit the YAML's architecture: {e}") from e


class TamingEncoder(nn.Module):
    """x (B, 3, H, W) in [-1, 1] -> quant_conv(encoder(x)) (B, embed_dim, h, w)."""

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__()
        from taming.modules.diffusionmodules.model import Encoder

        self.encoder = Encoder(**params["ddconfig"])
        self.quant_conv = nn.Conv2d(params["ddconfig"]["z_channels"], params["embed_dim"], 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x))


def load_taming_stage1(
    ckpt: str | os.PathLike, config: str | os.PathLike, device: str | torch.device = "cpu"
) -> FrozenStage1:
    """The frozen stage 1 (encoder, quant_conv, codebook) of a taming VQGAN checkpoint + YAML."""
    params = read_taming_config(config)
    state = _state_dict(ckpt)
    encoder = TamingEncoder(params)
    for prefix in ("encoder.", "quant_conv."):
        _load_part(getattr(encoder, prefix[:-1]), state, prefix, str(ckpt))
    codebook = state["quantize.embedding.weight"].float()  # (K, D)
    if tuple(codebook.shape) != (params["n_embed"], params["embed_dim"]):
        raise ValueError(
            f"{ckpt}: codebook is {tuple(codebook.shape)}, the YAML says ({params['n_embed']}, {params['embed_dim']})"
        )
    arch = {"ddconfig": params["ddconfig"], "n_embed": params["n_embed"], "embed_dim": params["embed_dim"]}
    stage1 = FrozenStage1(
        encoder,
        vq_bottleneck(codebook),
        source_class="taming.VQModel",
        latent_channels=params["embed_dim"],
        downsample=2 ** (len(params["ddconfig"]["ch_mult"]) - 1),
        sha256=encoder_sha256("taming.VQModel", arch, state),
    )
    return stage1.to(device)


class TamingDecoder(nn.Module):
    """Stage-2 decoder in taming's architecture: z_q (B, embed_dim, h, w) -> decoder(post_quant_conv(z_q))
    (B, 3, h*f, w*f) in [-1, 1]. State-dict keys are the VQGAN's own ("post_quant_conv.*", "decoder.*")."""

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder

        self.params = params
        self.post_quant_conv = nn.Conv2d(params["embed_dim"], params["ddconfig"]["z_channels"], 1)
        self.decoder = Decoder(**params["ddconfig"])

    @classmethod
    def from_source(cls, ckpt: str | os.PathLike, config: str | os.PathLike, init: str = "fresh") -> TamingDecoder:
        """init="fresh" (DAE stage 2) or "source" (the checkpoint's decoder weights)."""
        if init not in ("fresh", "source"):
            raise ValueError(f"init must be 'fresh' or 'source', got {init!r}")
        decoder = cls(read_taming_config(config))
        if init == "source":
            state = _state_dict(ckpt)
            for prefix in DECODER_SIDE:
                _load_part(getattr(decoder, prefix[:-1]), state, prefix, str(ckpt))
        return decoder

    @property
    def last_layer(self) -> Tensor:
        """W_last of the adaptive GAN weight (docs/paper.md §3); taming's VQModel.get_last_layer too."""
        return self.decoder.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))


def export_taming(
    decoder: TamingDecoder, ckpt: str | os.PathLike, config: str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """Write out_dir/last.ckpt ({"state_dict": the source's, with post_quant_conv.* and decoder.* from
    `decoder`}) and out_dir/config.yaml (the source YAML). Returns out_dir."""
    if not isinstance(decoder, TamingDecoder):
        raise TypeError(f"export_taming: decoder must be a TamingDecoder, got {type(decoder).__name__}")
    if decoder.params != read_taming_config(config):
        raise ValueError(f"export_taming: the decoder was built for another config than {config}")
    state = {k: v for k, v in _state_dict(ckpt).items() if not k.startswith(DECODER_SIDE)}
    state.update({k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, out / CKPT_FILE)
    shutil.copyfile(config, out / CONFIG_FILE)
    return out
