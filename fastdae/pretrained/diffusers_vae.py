"""Bring your own stage 1: a pretrained diffusers `AutoencoderKL` or `VQModel` (a local folder) as the
frozen stage-1 encoder, and a stage-2 decoder in diffusers' own architecture that exports back to a
folder `AutoencoderKL.from_pretrained` / `VQModel.from_pretrained` loads.

    stage1 = load_stage1("my-vae")                                  # frozen encoder + bottleneck
    cache = LatentCache.build("run/cache", dataset, stage1.encode_fields,
                              encoder_sha256=stage1.sha256, dataset_fingerprint=fp)
    decoder = DiffusersDecoder.from_source("my-vae")                # diffusers' Decoder, fresh weights
    for fields, x in cache.paired_loader(dataset, 64):              # stage 2, the encoder never runs
        x_hat = decoder(stage1.bottleneck.latent(fields))           # (B, 3, H, W) in [-1, 1]
        ...
    export_diffusers(decoder, "my-vae", "my-vae-dae")               # source encoder + new decoder

The latent is the tensor diffusers' `decode` takes, unscaled (pipelines multiply it by
`scaling_factor` after subtracting `shift_factor`; fastdae's prior scales by the cache's per-channel
statistics instead, and the adapter carries both factors for callers that need the pipeline's):
  AutoencoderKL  moments = quant_conv(encoder(x)) (B, 2C, h, w) -> mean, logvar clamped to [-30, 20]
                 (diffusers' DiagonalGaussianDistribution and fastdae's KLBottleneck agree); the cache
                 keeps both, like fastdae's own KL fields; the latent is the posterior mean
                 (posterior="mean", `latent_dist.mode()`) or a fresh draw per call
                 (posterior="sample", `latent_dist.sample()`).
  VQModel        h = quant_conv(encoder(x)) (B, D, h, w) -> nearest code (B, h, w) in the codebook
                 `quantize.embedding.weight` (K, D), found by fastdae.vector_quantize; the cache keeps
                 the indices; the latent is their code vectors z_q (B, D, h, w). `VQModel.decode(z_q)`
                 quantizes again (a code vector is its own nearest code), then applies
                 post_quant_conv, which belongs to the decoder side and so to DiffusersDecoder.

The decoder is diffusers' `Decoder` plus `post_quant_conv`, taken from a model the source config
builds (`from_config`), so its construction is exactly what `from_pretrained` will build; encoder
and decoder share the config in the diffusers layout, so the exported config is the source's and
only the decoder-side weights change. diffusers is imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastdae.models.autoencoder import AutoencoderConfig, KLBottleneck, VQBottleneck

CONFIG_FILE = "config.json"
SUPPORTED = ("AutoencoderKL", "VQModel")
POSTERIORS = ("mean", "sample")
ENCODER_SIDE = ("encoder.", "quant_conv.", "quantize.")  # what the latents depend on
DECODER_SIDE = ("post_quant_conv", "decoder")  # submodules DiffusersDecoder owns


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """config.json of a local diffusers AutoencoderKL / VQModel folder, checked to be one of those."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        # checked here: diffusers would take a missing local path for a Hub repo id and try to download it
        raise FileNotFoundError(f"{folder} is not a local diffusers model folder: {path} does not exist")
    config = json.loads(path.read_text())
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in SUPPORTED:
        raise ValueError(f"{path}: _class_name is {name!r}; fastdae takes a diffusers model of class {SUPPORTED}")
    return config


def latent_shape(folder: str | os.PathLike) -> tuple[int, int]:
    """(latent channels, downsampling factor) of the model in `folder`, from config.json alone."""
    config = read_config(folder)
    channels = config.get("latent_channels", 4 if config["_class_name"] == "AutoencoderKL" else 3)
    if config["_class_name"] == "VQModel":
        channels = config.get("vq_embed_dim") or channels  # the codebook's dim, the latent the decoder takes
    return int(channels), 2 ** (len(config.get("block_out_channels", (64,))) - 1)  # x2 per block but the last


def _model_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def load_diffusers_vae(folder: str | os.PathLike) -> nn.Module:
    """The diffusers model in `folder` (local files only, never the Hub), float32, eval mode."""
    name = read_config(folder)["_class_name"]
    return _model_class(name).from_pretrained(str(folder), local_files_only=True).float().eval()


class DiffusersKL(KLBottleneck):
    """fastdae's KL bottleneck (same moments, clamp and cache fields) whose latent is the posterior
    mean unless posterior="sample"."""

    def __init__(self, posterior: str = "mean") -> None:
        super().__init__()
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
        self.posterior = posterior

    def latent(self, fields: dict[str, Tensor], sample: bool = True) -> Tensor:
        """Cached {"mean", "logvar"} -> (B, C, h, w): the mean, or with posterior="sample" and sample=True
        a fresh draw mean + exp(logvar / 2) * eps."""
        return super().latent(fields, sample and self.posterior == "sample")


def vq_bottleneck(codebook: Tensor) -> VQBottleneck:
    """fastdae's VQ bottleneck over a fixed codebook (K, D) (VQModel's quantize.embedding.weight)."""
    K, D = codebook.shape
    bottleneck = VQBottleneck(AutoencoderConfig(bottleneck="vq", z_channels=D, num_codes=K))
    with torch.no_grad():
        bottleneck.quantizer.codebook.copy_(codebook)
    return bottleneck.eval().requires_grad_(False)


class DiffusersEncoder(nn.Module):
    """x (B, 3, H, W) in [-1, 1] -> quant_conv(encoder(x)): KL moments (B, 2C, h, w) or VQ h (B, D, h, w)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv  # None in an AutoencoderKL with use_quant_conv=False

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)


class FrozenStage1(nn.Module):
    """A pretrained encoder used frozen as stage 1, with the interface fastdae's own encoder +
    bottleneck give the cache writer and the later stages:

      encode_fields(x) -> (fields, stats_latent)   the cache's `encode` (LatentCache.build)
      encoder(x) -> h; bottleneck.encode_fields(h)  the same in two steps (encoder under autocast)
      bottleneck.latent(fields, sample)            cached fields -> decoder/prior input (B, C, h, w)
      bottleneck.quantizer.codebook                VQ: (K, D), to snap prior samples to codes
      kind ("kl" | "vq"), latent_channels, downsample, num_codes, scaling_factor, shift_factor
      sha256                                       identity of everything the latents depend on
    """

    def __init__(
        self,
        encoder: nn.Module,
        bottleneck: KLBottleneck | VQBottleneck,
        *,
        source_class: str,
        latent_channels: int,
        downsample: int,
        sha256: str,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.bottleneck = encoder, bottleneck
        self.kind = "vq" if isinstance(bottleneck, VQBottleneck) else "kl"
        self.num_codes = bottleneck.quantizer.num_codes if self.kind == "vq" else 0
        self.source_class, self.latent_channels, self.downsample = source_class, latent_channels, downsample
        self.sha256, self.scaling_factor, self.shift_factor = sha256, scaling_factor, shift_factor
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenStage1:
        return super().train(False)  # frozen: never in training mode (the VQ codebook must not move)

    def release_encoder(self) -> None:
        """Free the encoder's weights: the stages after the cache read latents only (`sha256`, the
        bottleneck and the codebook stay)."""
        self.encoder = None

    @torch.no_grad()
    def encode_fields(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> (KL {"mean", "logvar"} | VQ {"indices" (B, h, w)}, stats
        latent: the mean | z_q (B, C, h, w)); the bottleneck runs in float32 (exact code choice).

        Fields come back contiguous: diffusers' encoder returns channels-last strided maps, whose
        mean/logvar halves LatentCache.build (as of this commit) would store with scrambled element order,
        and on which randn_like would draw in another order than diffusers' latent_dist.sample()."""
        if self.encoder is None:
            raise RuntimeError("FrozenStage1.encode_fields: the encoder was released (release_encoder) after the cache")
        fields, stats = self.bottleneck.encode_fields(self.encoder(x).float())
        return {name: t.contiguous() for name, t in fields.items()}, stats

    def latent(self, fields: dict[str, Tensor], sample: bool = True) -> Tensor:
        return self.bottleneck.latent(fields, sample)


class DiffusersStage1(FrozenStage1):
    """The frozen stage 1 of a diffusers AutoencoderKL / VQModel (see FrozenStage1 for the interface)."""

    def __init__(self, vae: nn.Module, posterior: str = "mean") -> None:
        config = dict(vae.config)
        name = config.get("_class_name", type(vae).__name__)
        if name not in SUPPORTED:
            raise TypeError(f"DiffusersStage1: vae must be one of diffusers' {SUPPORTED}, got {name}")
        if name == "AutoencoderKL":
            bottleneck: KLBottleneck | VQBottleneck = DiffusersKL(posterior)
            channels = int(config["latent_channels"])
        else:
            codebook = vae.quantize.embedding.weight.detach().float()  # (K, D)
            bottleneck, channels = vq_bottleneck(codebook), codebook.shape[1]
        sha = encoder_sha256(name, {k: v for k, v in config.items() if not k.startswith("_")}, vae.state_dict())
        super().__init__(
            DiffusersEncoder(vae),
            bottleneck,
            source_class=name,
            latent_channels=channels,
            downsample=2 ** (len(config["block_out_channels"]) - 1),  # x2 per block but the last
            sha256=sha,
            scaling_factor=float(config.get("scaling_factor", 1.0)),
            shift_factor=config.get("shift_factor"),
        )


def encoder_sha256(source_class: str, config: dict[str, Any], state: dict[str, Tensor]) -> str:
    """sha256 of the class, the architecture config and every encoder-side tensor (name, dtype, shape,
    bytes): equal for a source and its export, whose decoder differs."""
    h = hashlib.sha256(source_class.encode())
    h.update(json.dumps(config, sort_keys=True, default=list).encode())
    for name in sorted(n for n in state if n.startswith(ENCODER_SIDE)):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_stage1(
    folder: str | os.PathLike, posterior: str = "mean", device: str | torch.device = "cpu"
) -> DiffusersStage1:
    """The frozen stage 1 of the diffusers AutoencoderKL / VQModel in `folder`, on `device`, eval mode."""
    return DiffusersStage1(load_diffusers_vae(folder), posterior).to(device)


class DiffusersDecoder(nn.Module):
    """Stage-2 decoder in diffusers' architecture: z (B, C, h, w) -> x_hat (B, 3, h*f, w*f) in [-1, 1].

    post_quant_conv (None in an AutoencoderKL with use_post_quant_conv=False) then diffusers' `Decoder`,
    both taken from a model built from the source config; a VQModel with norm_type="spatial" also
    conditions the decoder's norms on z, as VQModel.decode does. State-dict keys are the diffusers
    model's own ("post_quant_conv.*", "decoder.*")."""

    def __init__(self, config: dict[str, Any], vae: nn.Module | None = None) -> None:
        super().__init__()
        self.config = {k: v for k, v in config.items() if k != "_use_default_values"}
        name = self.config.get("_class_name")
        if name not in SUPPORTED:
            raise ValueError(f"DiffusersDecoder: config _class_name must be one of {SUPPORTED}, got {name!r}")
        if vae is None:  # fresh weights, diffusers' own initialisation
            vae = _model_class(name).from_config(self.config)
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.spatial = name == "VQModel" and self.config.get("norm_type", "group") == "spatial"

    @classmethod
    def from_source(cls, folder: str | os.PathLike, init: str = "fresh") -> DiffusersDecoder:
        """A decoder for the model in `folder`: init="fresh" (DAE stage 2 trains it from scratch) or
        "source" (starts from the source model's decoder weights, i.e. fine-tuning)."""
        if init not in ("fresh", "source"):
            raise ValueError(f"init must be 'fresh' or 'source', got {init!r}")
        config = read_config(folder)
        return cls(config, load_diffusers_vae(folder).train() if init == "source" else None)

    @property
    def last_layer(self) -> Tensor:
        """W_last of the adaptive GAN weight (docs/paper.md §3)."""
        return self.decoder.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        q = z if self.post_quant_conv is None else self.post_quant_conv(z)
        return self.decoder(q, z if self.spatial else None)


def export_diffusers(decoder: DiffusersDecoder, source: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir` as a complete diffusers folder: the source model's config and encoder-side weights
    (encoder, quant_conv, VQ codebook) with `decoder`'s post_quant_conv and Decoder weights. Returns out_dir.

    `AutoencoderKL.from_pretrained(out_dir).decode(z).sample` (VQModel: `.decode(z_q)`) then equals
    `decoder(z)`. The decoder must have been built for `source` (same architecture: diffusers shares one
    config between encoder and decoder); anything else raises before a file is written."""
    if not isinstance(decoder, DiffusersDecoder):
        raise TypeError(f"export_diffusers: decoder must be a DiffusersDecoder, got {type(decoder).__name__}")
    config = {k: v for k, v in read_config(source).items() if k != "_use_default_values"}
    differ = sorted(
        k
        for k in config.keys() | decoder.config.keys()
        if not k.startswith("_") and _jsonable(config.get(k)) != _jsonable(decoder.config.get(k))
    )
    if config["_class_name"] != decoder.config["_class_name"] or differ:
        raise ValueError(
            f"export_diffusers: the decoder was built for another model than {source} "
            f"(class {decoder.config['_class_name']} vs {config['_class_name']}; "
            f"config keys differ: {differ})"
        )
    vae = load_diffusers_vae(source)
    for name in DECODER_SIDE:
        ours = getattr(decoder, name)
        if ours is not None:
            getattr(vae, name).load_state_dict(ours.state_dict(), strict=True)
    out = Path(out_dir)
    vae.save_pretrained(str(out))  # config.json + diffusion_pytorch_model.safetensors
    return out


def _jsonable(value: Any) -> Any:
    """Config values as config.json holds them (tuples become lists)."""
    return json.loads(json.dumps(value, default=list))
