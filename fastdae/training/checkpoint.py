"""Checkpoints and weights of a stage folder.

    stage1/ckpt-00000400/   <name>.safetensors per module (EMAs as ema_<name>) + state.pt
    stage1/latest           the name of the newest complete checkpoint folder

A checkpoint is written into a temp folder, fsynced and renamed, then `latest` is replaced
atomically; a SIGKILL at any point leaves the previous checkpoint valid, and a failed write (disk
full) removes its temp folder. The new checkpoint and the one before it are kept. `latest` must
name a ckpt-<step> folder inside the stage folder, else the run is refused.
"""

from __future__ import annotations

import pickle
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fastdae import files
from fastdae.training.distributed import unwrap
from fastdae.training.identity import RunError
from fastdae.training.optim import EMA, Updater

LATEST = "latest"
CORRUPT_ADVICE = (
    "the file is corrupted or was replaced; remove that checkpoint folder to resume from the one before "
    "(and point `latest` at it), or train the stage again without resume"
)
CHECKPOINT = re.compile(r"ckpt-(\d{8})")


def save_weights(path: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """Weights as safetensors, written atomically (readers never see a partial file)."""
    with files.atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    return Path(path)


def load_weights(path: str | Path, module: nn.Module, prefix: str = "") -> None:
    """Load `prefix`-ed keys of a safetensors file into module (strict); a file that is no such
    safetensors file (truncated, overwritten, another model's) is a RunError naming it."""
    try:
        state = load_file(str(path))
        if prefix:
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(state)
    except (SafetensorError, RuntimeError, ValueError) as e:  # RuntimeError: keys or shapes of another model
        raise RunError(f"{path} cannot be loaded ({type(e).__name__}: {_first_line(e)}): {CORRUPT_ADVICE}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The checkpoint folder `latest` names, None without one."""
    pointer = stage_dir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_bytes().decode(errors="replace").strip()
    path = stage_dir / name
    if not CHECKPOINT.fullmatch(name) or not path.is_dir():
        raise RunError(
            f"{pointer} names {name!r}, not a ckpt-<step> folder inside {stage_dir}; "
            f"the run folder was edited or another run wrote it (rerun with overwrite)"
        )
    return path


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path} is not a ckpt-<step> folder")
    return int(match.group(1))


@dataclass
class State:
    """What a checkpoint holds, by name: modules, their EMAs (saved as ema_<name>) and updaters
    (optimizer, LR scheduler and GradScaler states, in state.pt under "optimizers", "schedulers",
    "scalers")."""

    modules: dict[str, nn.Module]
    updaters: dict[str, Updater] = field(default_factory=dict)
    emas: dict[str, EMA] = field(default_factory=dict)

    def keep_ema(self, name: str, module: nn.Module, decay: float) -> None:
        """Keep emas[name], an EMA of `module`'s weights, when decay > 0 (0: no EMA)."""
        if decay > 0:
            self.emas[name] = EMA(module, decay)

    def update_emas(self, step: int) -> None:
        """After the optimizer step of (0-based) `step`."""
        for ema in self.emas.values():
            ema.update(step)

    def final(self, name: str, module: nn.Module) -> nn.Module:
        """The weights a stage writes for `name`: its EMA's when one is kept, else `module`'s."""
        return self.emas[name].module if name in self.emas else module

    def saved_modules(self) -> dict[str, nn.Module]:
        """Every module a checkpoint holds, by file name: the modules, then the EMAs as ema_<name>."""
        return {**self.modules, **{f"ema_{name}": ema for name, ema in self.emas.items()}}


def save_checkpoint(stage_dir: Path, step: int, state: State) -> Path:
    final = stage_dir / f"ckpt-{step:08d}"
    with files.atomic_path(final) as tmp:
        tmp.mkdir()
        for name, module in state.saved_modules().items():
            save_weights(tmp / f"{name}.safetensors", unwrap(module).state_dict())
        with files.atomic_path(tmp / "state.pt") as state_file:
            parts = {k: u.state_dict() for k, u in state.updaters.items()}
            torch.save(
                {
                    "step": step,
                    **{
                        f"{part}s": {k: p[part] for k, p in parts.items()}
                        for part in ("optimizer", "scheduler", "scaler")
                    },
                },
                state_file,
            )
    files.write_bytes(stage_dir / LATEST, final.name.encode())
    older = sorted(p for p in stage_dir.glob("ckpt-*") if p != final)
    for old in older[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore(path: Path | None, state: State, lrs: dict[str, float]) -> int:
    """The step to start from: 0, or the step of checkpoint `path` after restoring `state` from it; the
    updaters named in `lrs` then use the configured learning rate (it may change on resume)."""
    if path is None:
        return 0
    for name, module in state.saved_modules().items():
        load_weights(path / f"{name}.safetensors", unwrap(module))
    try:
        saved = torch.load(path / "state.pt", weights_only=True)
        if not isinstance(saved, dict) or not {"step", "optimizers", "schedulers"} <= saved.keys():
            raise ValueError("not a fastdae checkpoint state")
    except (RuntimeError, ValueError, EOFError, struct.error, pickle.UnpicklingError) as e:
        raise RunError(
            f"{path / 'state.pt'} cannot be loaded ({type(e).__name__}: {_first_line(e)}): {CORRUPT_ADVICE}"
        ) from None
    for k, u in state.updaters.items():
        u.load_state_dict(
            {
                "optimizer": saved["optimizers"][k],
                "scheduler": saved["schedulers"][k],
                "scaler": saved.get("scalers", {}).get(k, {}),
            }
        )  # no "scalers": saved before fp16 existed
    for k, lr in lrs.items():
        if k in state.updaters:
            state.updaters[k].set_lr(lr)
    return int(saved["step"])
