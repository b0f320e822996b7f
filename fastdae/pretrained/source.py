"""`stage1.encoder`: the pretrained stage-1 sources fastdae takes, told apart by what the folder holds.

    diffusers  config.json (AutoencoderKL / VQModel) + weights        -> fastdae.pretrained.diffusers_vae
    taming     last.ckpt + config.yaml (as export_taming writes), or a taming log folder
               (checkpoints/last.ckpt + configs/*-project.yaml)      -> fastdae.pretrained.taming_vqgan

Each function takes that folder; the trainer (fastdae.training.Run) calls only these.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fastdae.pretrained import diffusers_vae, taming_vqgan
from fastdae.pretrained.diffusers_vae import FrozenStage1

KINDS = ("diffusers", "taming")


def taming_files(folder: str | os.PathLike) -> tuple[Path, Path] | None:
    """(checkpoint, YAML) of a taming VQGAN folder, or None when `folder` is not one."""
    root = Path(folder)
    for ckpt, configs in (
        (root / taming_vqgan.CKPT_FILE, [root / taming_vqgan.CONFIG_FILE]),
        (root / "checkpoints" / "last.ckpt", sorted((root / "configs").glob("*-project.yaml"))),
    ):
        if ckpt.is_file() and len(configs) == 1 and configs[0].is_file():
            return ckpt, configs[0]
    return None


def source_kind(folder: str | os.PathLike) -> str:
    """ "diffusers" or "taming"; FileNotFoundError naming both layouts when the folder is neither."""
    if (Path(folder) / diffusers_vae.CONFIG_FILE).is_file():
        return "diffusers"
    if taming_files(folder) is not None:
        return "taming"
    raise FileNotFoundError(
        f"{folder} is neither a diffusers model folder (config.json) nor a taming VQGAN folder "
        f"(last.ckpt + config.yaml, or checkpoints/last.ckpt + configs/*-project.yaml)"
    )


def latent_shape(folder: str | os.PathLike) -> tuple[int, int]:
    """(latent channels, downsampling factor), from the folder's config alone."""
    if source_kind(folder) == "diffusers":
        return diffusers_vae.latent_shape(folder)
    params = taming_vqgan.read_taming_config(taming_files(folder)[1])
    return int(params["embed_dim"]), 2 ** (len(params["ddconfig"]["ch_mult"]) - 1)


def load_stage1(folder: str | os.PathLike, posterior: str = "mean", device: str | torch.device = "cpu") -> FrozenStage1:
    """The frozen stage 1 in `folder` (posterior: KL only, "mean" or "sample")."""
    if source_kind(folder) == "diffusers":
        return diffusers_vae.load_stage1(folder, posterior, device)
    return taming_vqgan.load_taming_stage1(*taming_files(folder), device=device)


def build_decoder(folder: str | os.PathLike) -> diffusers_vae.DiffusersDecoder | taming_vqgan.TamingDecoder:
    """A fresh stage-2 decoder in the source's architecture (diffusers' or taming's Decoder)."""
    if source_kind(folder) == "diffusers":
        return diffusers_vae.DiffusersDecoder.from_source(folder)
    return taming_vqgan.TamingDecoder.from_source(*taming_files(folder))


def export_decoder(decoder: nn.Module, folder: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """The source with `decoder` in place of its own, in the source's format (export_diffusers / export_taming)."""
    if source_kind(folder) == "diffusers":
        return diffusers_vae.export_diffusers(decoder, folder, out_dir)
    return taming_vqgan.export_taming(decoder, *taming_files(folder), out_dir)
