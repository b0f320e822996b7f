"""Command line: argument parsing only; every command is a call of the Python API.

    python -m fastdae train --preset default --out runs/x --stage2.steps 2000
    python -m fastdae train --config run.yaml --resume
    python -m fastdae compare --preset default --seeds 3 --out results/compare
    python -m fastdae compare --preset default --seeds 5 --out results/study-textures --data.name textures
    python -m fastdae sample --run runs/x --num-samples 50000 --out samples.npz
    python -m fastdae fid REAL FAKE --inception pt_inception-2015-12-05-6726825d.pth
    python -m fastdae plan --preset imagenet256-kl --gpus 8 --gpu h100 --mfu 0.4 [--json]

COMMANDS lists the subcommands (name -> (help, add_arguments, run)). A config the run cannot use
(bad value, YAML, preset, missing file, a run folder that holds another run, a cache of other data)
is printed as one line without a traceback, and the command exits with status 2; so are the errors
of `sample` and `fid` (a missing or stale run, bad input files), unreadable images of the data, and
OS errors on a named file (permissions, a full disk): `one_line` makes one line of each.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace, list[str]], int]
USAGE_ERROR = 2  # argparse's status for bad arguments


def parse_overrides(extra: list[str]) -> list[str]:
    """["--stage2.steps", "2000", "--mode=joint"] -> ["stage2.steps=2000", "mode=joint"]."""
    from fastdae.config import ConfigError

    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or len(item) == 2:
            raise ConfigError(f"expected a --key value override, got {item!r}")
        key, sep, value = item[2:].partition("=")
        if not sep:
            if i + 1 >= len(extra):
                raise ConfigError(f"override --{key} needs a value")
            i += 1
            value = extra[i]
        out.append(f"{key}={value}")
        i += 1
    return out


def _base_config(args: argparse.Namespace, extra: list[str]) -> Any:
    """--preset < --config < --key value overrides."""
    from fastdae.config import TrainConfig, apply_overrides, preset

    base = preset(args.preset) if args.preset else TrainConfig()
    cfg = TrainConfig.load(args.config, base=base) if args.config else base
    return apply_overrides(cfg, parse_overrides(extra))


def _config_arguments(p: argparse.ArgumentParser) -> None:
    from fastdae.config import PRESETS

    p.add_argument("--config", help="YAML config (keys missing there come from --preset, else the defaults)")
    p.add_argument("--preset", help="named config: " + ", ".join(sorted(PRESETS)))


# ---- train ------------------------------------------------------------------------------------
def _train_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--out", help="run directory (config out_dir)")
    p.add_argument(
        "--resume", action="store_true", help="continue each stage from its last checkpoint (docs/training.md: resume)"
    )
    p.add_argument("--overwrite", action="store_true", help="clear an out_dir that holds another run first")


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from fastdae.training import train

    flags = [f"out_dir={args.out}"] if args.out else []
    flags += ["resume=true"] * args.resume + ["overwrite=true"] * args.overwrite
    result = train(_base_config(args, [*extra, *(f"--{f}" for f in flags)]))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    print(f"run directory: {result.run_dir}")
    if result.sample_grid is not None:
        print(f"samples: {result.sample_grid}")
    if result.summary is not None:
        print(f"summary: {result.summary}")
    return 0


# ---- compare ----------------------------------------------------------------------------------
def _compare_arguments(p: argparse.ArgumentParser) -> None:
    from fastdae.evaluation import KNOBS

    _config_arguments(p)
    p.add_argument("--arms", default="joint,dae,control", help="comma-separated arms (joint, dae, control)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="results/compare", help="report directory (runs go to <out>/runs)")
    p.add_argument("--ablate", help="instead of the arms: weak_decoder knob to ablate (" + ", ".join(KNOBS) + ")")
    p.add_argument("--values", help="comma-separated values of the ablated knob")
    p.add_argument("--eval", help="YAML mapping of EvalConfig fields (e.g. capacity_steps: 100)")


def _compare(args: argparse.Namespace, extra: list[str]) -> int:
    import yaml

    from fastdae.config import ConfigError
    from fastdae.evaluation import EvalConfig, ablation, compare, markdown

    cfg = _base_config(args, extra)
    try:
        ev = EvalConfig(**(yaml.safe_load(Path(args.eval).read_text()) or {})) if args.eval else EvalConfig()
    except (OSError, yaml.YAMLError, ValueError, TypeError) as e:
        raise ConfigError(f"--eval {args.eval}: {e}") from None
    argv = [
        a
        for n in ("config", "preset", "arms", "seeds", "out", "ablate", "values", "eval")
        if (v := getattr(args, n)) is not None
        for a in (f"--{n}", str(v))
    ]
    command = "python -m fastdae compare " + " ".join(shlex.quote(a) for a in [*argv, *extra])
    if args.ablate:
        if not args.values:
            raise ConfigError("--ablate needs --values")
        values = [yaml.safe_load(v) for v in args.values.split(",")]
        report = ablation(cfg, args.ablate, values, args.seeds, args.out, ev, command=command)
    else:
        report = compare(cfg, [a.strip() for a in args.arms.split(",")], args.seeds, args.out, ev, command=command)
    print(markdown(report))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


# ---- sample -----------------------------------------------------------------------------------
def _sample_arguments(p: argparse.ArgumentParser) -> None:
    from fastdae.models.diffusion import SAMPLERS  # not fastdae.sampling: it imports the DiT

    p.add_argument("--run", required=True, help="a finished run folder (config.yaml, prior/, stage2/, cache/)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--out", default="samples.npz", help="ADM-layout .npz: arr_0 uint8 (N, H, W, 3), arr_1 labels")
    p.add_argument("--png-dir", help="also write every sample as <index>.png here")
    p.add_argument("--batch-size", type=int, default=64, help="samples per DiT batch (per rank)")
    p.add_argument(
        "--cfg-scale", type=float, help="classifier-free guidance scale (default: the run's prior.cfg_scale)"
    )
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's prior.sample_steps)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the run's prior.sampler")
    p.add_argument("--labels", default="balanced", help="class labels: balanced (cycled) or random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def _sample(args: argparse.Namespace, extra: list[str]) -> int:
    from fastdae.sampling import sample

    out = _call_api(sample, args, extra)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"samples: {out}")
    return 0


# ---- fid --------------------------------------------------------------------------------------
def _fid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("real", help="folder of images, .npz with arr_0 (N, H, W, 3) uint8, or .npz with mu and sigma")
    p.add_argument("fake", help="same kinds as REAL")
    p.add_argument(
        "--inception", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (local; nothing is downloaded)"
    )
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--stats-cache", help="folder caching each image source's statistics")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, help="image-decoding workers for folders (default: CPU cores, at most 8)")


def _fid(args: argparse.Namespace, extra: list[str]) -> int:
    from fastdae.measure.fid import fid

    print(f"FID: {_call_api(fid, args, extra, progress=True):.4f}")
    return 0


# ---- plan -------------------------------------------------------------------------------------
def _plan_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument("--gpus", type=int, default=8, help="GPUs the run is spread over (DDP)")
    p.add_argument("--gpu", default="h100", help="h100, h200 or a100 (published dense bf16 peak and memory)")
    p.add_argument("--images", type=int, help="images in the dataset (default: ImageNet-1k's 1,281,167 for a folder)")
    p.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation the time estimate assumes")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def _plan(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from fastdae.plan import plan, table

    try:
        report = plan(_base_config(args, extra), args.gpu, args.gpus, args.images, args.mfu, args.preset or args.config)
    except ValueError as e:  # ConfigError (a ValueError too) is reported by main
        from fastdae.config import ConfigError

        if isinstance(e, ConfigError):
            raise
        return _usage_error("plan", e)
    print(json.dumps(report.to_dict(), indent=2) if args.json else table(report))
    return 0


COMMANDS: dict[str, tuple[str, AddArguments, Run]] = {
    "train": ("run the DAE recipe (stage 1, cache, stage 2, prior, samples)", _train_arguments, _train),
    "compare": (
        "train and evaluate the joint / dae / control arms (or ablate the weak decoder), write a report",
        _compare_arguments,
        _compare,
    ),
    "sample": (
        "generate N samples of a finished run as an ADM-evaluator .npz (resumable, torchrun-ready)",
        _sample_arguments,
        _sample,
    ),
    "plan": (
        "estimate a config's per-stage FLOPs, GPU memory, largest batch, cache size and wall time (estimated)",
        _plan_arguments,
        _plan,
    ),
    "fid": (
        "Fréchet Inception distance between two image folders / .npz files (local Inception weights)",
        _fid_arguments,
        _fid,
    ),
}


def one_line(e: object) -> str:
    """An error's message as one line. An error re-raised from a DataLoader worker carries the worker's
    whole traceback in its message: its last line is the error itself ("ImageFileError: cannot read
    ..."), given without the class name. Other multi-line messages are joined."""
    text = str(e).strip()
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"  # "[Errno 13] Permission denied: 'x'" -> "x: Permission denied"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.endswith("Traceback (most recent call last):") for line in lines):
        name, sep, message = lines[-1].partition(": ")
        return message if sep and name.replace(".", "").isidentifier() else lines[-1]
    return " ".join(lines)


def out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: numpy's MemoryError, torch's OutOfMemoryError (CUDA) or the
    RuntimeError of its CPU allocator ("DefaultCPUAllocator: can't allocate memory")."""
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


class UsageError(Exception):
    """What the user asked of a command cannot be done: main prints it as one line, exit status 2."""


def _call_api(fn: Callable[..., Any], args: argparse.Namespace, extra: list[str], **kwargs: Any) -> Any:
    """fn(**the parsed arguments, **kwargs), for commands whose argument names are fn's parameter
    names (sample, fid). They take no --key overrides, so `extra` is an error; fn's ValueError (bad
    input, a stale run) is the user's, as an OSError on a file they named is (see main)."""
    if extra:
        raise UsageError(f"unrecognized arguments {extra}")
    try:
        return fn(**{k: v for k, v in vars(args).items() if k != "command"}, **kwargs)
    except ValueError as e:
        raise UsageError(one_line(e)) from None


def _usage_error(command: str, e: object) -> int:
    """What the user asked for cannot be done (bad input, a missing or stale run): one line on stderr,
    no traceback, exit status USAGE_ERROR, as for config errors."""
    message = one_line(e)
    message = message.removeprefix(f"{command}: ")  # the API's own "sample: ..." prefix, said once
    print(f"fastdae {command}: {message}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: list[str] | None = None) -> int:
    from fastdae.cache import CacheError
    from fastdae.config import ConfigError
    from fastdae.data import DataError

    parser = argparse.ArgumentParser(prog="fastdae", description="Decoupled autoencoders with a latent cache")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help, description=help))
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command][2](args, extra)
    except (ConfigError, CacheError, DataError, UsageError) as e:  # the user's config, run, data: one line
        return _usage_error(args.command, e)
    except OSError as e:  # a file the user named (or one in their run or data) cannot be read or written
        return _usage_error(args.command, e)
    except (MemoryError, RuntimeError) as e:  # numpy's and torch's allocators: a size the config asks for
        if not out_of_memory(e):
            raise
        return _usage_error(args.command, f"out of memory ({one_line(e)}); lower the size or count that asks for it")


if __name__ == "__main__":
    sys.exit(main())
