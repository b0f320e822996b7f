"""Save a trained decoder or autoencoder as `model.safetensors` + `config.json`; load it back anywhere.

    save_pretrained(decoder, "export/dae-decoder", ae_cfg)          # a Decoder (full, or weak=...)
    save_pretrained(autoencoder, "export/dae", ae_cfg)              # encoder + bottleneck + decoder
    model = load_pretrained("export/dae-decoder")                   # nn.Module in eval mode

config.json holds the format version, what was saved ("decoder" or "autoencoder"), the
AutoencoderConfig fields and, for a weakened decoder, the WeakDecoderConfig fields. Loading checks
the type of every config.json field against the dataclass, builds the module it describes on the
meta device (no memory: a config.json asking for a huge model costs nothing), checks every tensor
of model.safetensors against it by name, shape and kind (float / integer) and only then
materialises it with the file's tensors: a mismatch names the tensor, the shape config.json
implies and the shape found in the file. fastdae.training is never imported.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fastdae import __version__, files
from fastdae.config import ConfigError, coerce
from fastdae.models.autoencoder import Autoencoder, AutoencoderConfig, Decoder, WeakDecoderConfig, build_decoder

FORMAT = "fastdae-pretrained"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KINDS = ("decoder", "autoencoder")
_MAX_LISTED = 5  # tensor names listed in a missing/unexpected error


def _kind(module: nn.Module) -> str:
    if isinstance(module, Autoencoder):
        return "autoencoder"
    if isinstance(module, Decoder):
        return "decoder"
    raise TypeError(
        f"save_pretrained: module must be a fastdae Decoder or Autoencoder "
        f"(fastdae.models.autoencoder), got {type(module).__name__}"
    )


def _build(kind: str, config: AutoencoderConfig, weak: WeakDecoderConfig | None) -> nn.Module:
    """The module config.json describes, with freshly initialised weights."""
    decoder = build_decoder(config, weak)
    return decoder if kind == "decoder" else Autoencoder(config, decoder)


def _check_tensors(expected: dict[str, Tensor], found: dict[str, tuple[int, ...]], source: str) -> None:
    """Names and shapes of `found` (from `source`) against the (meta) state dict the config builds."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) the config implies: {missing[:_MAX_LISTED]}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) the config does not build: {unexpected[:_MAX_LISTED]}")
        raise ValueError(f"{source}: {'; '.join(parts)}")
    for name, tensor in expected.items():
        if tuple(tensor.shape) != found[name]:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {found[name]}, but the config implies {tuple(tensor.shape)}"
            )


def save_pretrained(
    module: nn.Module,
    path: str | os.PathLike,
    config: AutoencoderConfig,
    weak: WeakDecoderConfig | None = None,
) -> Path:
    """Write `path`/model.safetensors and `path`/config.json; returns the directory.

    module: a `Decoder` (the full stage-2 decoder, or the stage-1 auxiliary one with `weak` set to the
    WeakDecoderConfig it was built from) or an `Autoencoder` (encoder + bottleneck + its decoder).
    config: the AutoencoderConfig the module was built from (TrainConfig.autoencoder). The module is
    checked against it first, so a file that cannot be loaded back is never written.
    """
    kind = _kind(module)
    if not isinstance(config, AutoencoderConfig):
        raise TypeError(f"save_pretrained: config must be an AutoencoderConfig, got {type(config).__name__}")
    if weak is not None and not isinstance(weak, WeakDecoderConfig):
        raise TypeError(f"save_pretrained: weak must be a WeakDecoderConfig or None, got {type(weak).__name__}")
    state = {name: t.detach().to("cpu").contiguous() for name, t in module.state_dict().items()}
    with torch.device("meta"):  # shapes only: allocate nothing
        reference = _build(kind, config, weak).state_dict()
    found = {name: tuple(t.shape) for name, t in state.items()}
    _check_tensors(reference, found, f"save_pretrained({type(module).__name__})")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastdae_version": __version__,
        "kind": kind,
        "autoencoder": dataclasses.asdict(config),
        "weak_decoder": None if weak is None else dataclasses.asdict(weak),
    }
    return write_pair(out, state, meta)


def write_pair(out: Path, state: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """`out`/model.safetensors + `out`/config.json (meta, with meta["kind"]); shared with dit_export."""
    # atomic writes: an interrupted save (or a full disk) never leaves a half-written file behind
    with files.atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "kind": meta["kind"]})
    files.write_bytes(out / CONFIG_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return out


def _dataclass_from(cls: type, fields: Any, source: str) -> Any:
    if not isinstance(fields, dict):
        raise ValueError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(fields).__name__}")
    types = typing.get_type_hints(cls)
    unknown = sorted(fields.keys() - types.keys())
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown} (saved by a newer fastdae?)")
    checked = {}
    for name, value in fields.items():
        try:  # JSON types as they are: no parsing of strings (those come from the command line only)
            checked[name] = coerce(value, types[name], name, from_text=False)
        except ConfigError as e:
            raise ValueError(f"{source}: field {name!r}: {e}") from None
    try:
        return cls(**checked)
    except (ValueError, TypeError) as e:  # the dataclass's own range checks
        raise ValueError(f"{source}: {e}") from None


def read_meta(path: str | os.PathLike, caller: str) -> tuple[Path, dict[str, Any]]:
    """(`path`/config.json, its contents), checked to be a fastdae export of this format version;
    shared by the decoder and the DiT exports. `caller` names the loader in the missing-file error."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{caller}: {file} does not exist (expected {CONFIG_FILE} and {WEIGHTS_FILE} in {path})"
        )
    meta = json.loads(file.read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{file}: not a fastdae export (format {found!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {meta.get('format_version')!r}; this fastdae reads {FORMAT_VERSION}")
    return file, meta


def read_config(path: str | os.PathLike) -> tuple[str, AutoencoderConfig, WeakDecoderConfig | None]:
    """(kind, AutoencoderConfig, WeakDecoderConfig or None) from `path`/config.json, validated."""
    file, meta = read_meta(path, "load_pretrained")
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{file}: kind must be one of {KINDS}, got {meta.get('kind')!r}")
    config = _dataclass_from(AutoencoderConfig, meta.get("autoencoder"), f"{file} 'autoencoder'")
    weak = meta.get("weak_decoder")
    weak = None if weak is None else _dataclass_from(WeakDecoderConfig, weak, f"{file} 'weak_decoder'")
    return meta["kind"], config, weak


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The Decoder or Autoencoder saved in `path` by save_pretrained, on `device`, in eval mode.

    Raises FileNotFoundError when config.json or model.safetensors is missing, and ValueError naming
    the tensor, the shape config.json implies and the shape found when the weights do not fit."""
    kind, config, weak = read_config(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"load_pretrained: {weights} does not exist ({CONFIG_FILE} is there, the weights are not)"
        )
    with torch.device("meta"):  # shapes and dtypes only: nothing is allocated before the checks pass
        module = _build(kind, config, weak)
    expected = module.state_dict()
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        _check_tensors(expected, found, str(weights))
        state = {name: f.get_tensor(name) for name in found}
    for name, t in state.items():
        if t.dtype.is_floating_point != expected[name].dtype.is_floating_point:
            raise ValueError(f"{weights}: tensor {name!r} is {t.dtype}, but the config implies {expected[name].dtype}")
        state[name] = t.to(expected[name].dtype)
    module.load_state_dict(state, strict=True, assign=True)  # the file's tensors replace the meta ones
    left = [n for n, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{weights}: the module has tensors no state dict restores: {left[:_MAX_LISTED]}")
    return module.to(device).eval()
