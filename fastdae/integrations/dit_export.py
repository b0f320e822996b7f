"""Save a trained DiT prior as `model.safetensors` + `config.json`; load it back anywhere.

    save_dit(dit, "export/dit", diffusion, scaler)   # diffusion / scaler optional: what sampling needs
    prior = load_dit("export/dit")                   # PretrainedDiT(dit, diffusion, scaler), eval mode
    z = prior.diffusion.sample(prior.dit, (16, C, h, h), y=labels)

The same file pair and format as fastdae.integrations.export (format "fastdae-pretrained",
kind "dit"). config.json holds the DiT's constructor arguments (read off the module, so any DiT
saves), and optionally the diffusion it was trained with (make_diffusion's arguments) and the
per-channel latent statistics (LatentScaler) its latents are normalised by. Loading builds the DiT
on the meta device (no initialisation, no memory), checks every tensor of model.safetensors by
name and shape, then assigns the file's tensors.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fastdae import __version__
from fastdae.integrations.export import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    _check_tensors,
    read_meta,
    write_pair,
)
from fastdae.models.diffusion import Diffusion, LatentScaler, make_diffusion
from fastdae.models.dit import DiT

KIND = "dit"


@dataclass(frozen=True)
class DiTSpec:
    """DiT's constructor arguments (attn_impl aside: a runtime choice, not part of the weights)."""

    input_size: int
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    class_dropout_prob: float
    num_classes: int
    learn_sigma: bool

    @classmethod
    def of(cls, dit: DiT) -> DiTSpec:
        hidden = dit.pos_embed.shape[-1]
        if not dit.blocks:
            raise ValueError("save_dit: a DiT with no blocks cannot be described by its constructor")
        block = dit.blocks[0]
        dropout = dit.y_embedder.dropout_prob if dit.y_embedder is not None else 0.0
        return cls(
            dit.input_size,
            dit.patch_size,
            dit.in_channels,
            hidden,
            len(dit.blocks),
            block.attn.num_heads,
            block.mlp.fc1.out_features / hidden,
            dropout,
            dit.num_classes,
            dit.learn_sigma,
        )

    def build(self, attn_impl: str = "auto") -> DiT:
        return DiT(**dataclasses.asdict(self), attn_impl=attn_impl)


@dataclass
class PretrainedDiT:
    """What load_dit returns: the DiT (eval mode) and, when saved, its diffusion and latent scaler."""

    dit: DiT
    diffusion: Diffusion | None
    scaler: LatentScaler | None


def save_dit(
    dit: DiT, path: str | os.PathLike, diffusion: Diffusion | None = None, scaler: LatentScaler | None = None
) -> Path:
    """Write `path`/model.safetensors and `path`/config.json; returns the directory.

    diffusion: the Diffusion the DiT was trained with (its objective, schedule, num_timesteps are
    saved); scaler: the LatentScaler of its latents (mean, std per channel). Both optional."""
    if not isinstance(dit, DiT):
        raise TypeError(f"save_dit: dit must be a fastdae.models.dit.DiT, got {type(dit).__name__}")
    if scaler is not None and scaler.mean.shape != (dit.in_channels,):
        raise ValueError(f"save_dit: scaler has {scaler.mean.shape[0]} channels, the DiT {dit.in_channels}")
    spec = DiTSpec.of(dit)
    state = {name: t.detach().to("cpu").contiguous() for name, t in dit.state_dict().items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastdae_version": __version__,
        "kind": KIND,
        "dit": dataclasses.asdict(spec),
        "diffusion": None
        if diffusion is None
        else {
            "objective": diffusion.objective,
            "schedule": diffusion.schedule,
            "num_timesteps": diffusion.num_timesteps,
        },
        "latent_stats": None if scaler is None else {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()},
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return write_pair(out, state, meta)


def read_dit_config(path: str | os.PathLike) -> dict[str, Any]:
    """`path`/config.json of a DiT export, validated (format, version, kind, DiT fields)."""
    file, meta = read_meta(path, "load_dit")
    if meta.get("kind") != KIND:
        raise ValueError(
            f"{file}: kind {meta.get('kind')!r} is not a DiT (load it with fastdae.integrations.load_pretrained)"
        )
    fields = {f.name for f in dataclasses.fields(DiTSpec)}
    spec = meta.get("dit")
    if not isinstance(spec, dict) or set(spec) != fields:
        raise ValueError(f"{file}: 'dit' must hold exactly the fields {sorted(fields)}, got {spec!r}")
    return meta


def load_dit(path: str | os.PathLike, device: str | torch.device = "cpu", attn_impl: str = "auto") -> PretrainedDiT:
    """The DiT saved in `path` by save_dit (eval mode, on `device`), with its diffusion and latent
    scaler when they were saved (else None). A tensor the config does not imply, or of another
    shape, is a ValueError naming it."""
    meta = read_dit_config(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"load_dit: {weights} does not exist ({CONFIG_FILE} is there, the weights are not)")
    with torch.device("meta"):  # shapes only: nothing initialised or allocated
        dit = DiTSpec(**meta["dit"]).build(attn_impl)
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        _check_tensors(dit.state_dict(), found, str(weights))
        state = {name: f.get_tensor(name) for name in found}
    dit.load_state_dict(state, strict=True, assign=True)
    dit = dit.to(device).eval()
    diffusion = None if meta["diffusion"] is None else make_diffusion(**meta["diffusion"])
    stats = meta["latent_stats"]
    scaler = None if stats is None else LatentScaler(torch.tensor(stats["mean"]), torch.tensor(stats["std"])).to(device)
    return PretrainedDiT(dit, diffusion, scaler)
