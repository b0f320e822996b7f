"""Command line: argument parsing only; every command is a call of the Python API.

    python -m fastdae train --preset default --out runs/x --stage2.steps 2000
    python -m fastdae train --config run.yaml --resume true

Subcommands live in COMMANDS (name -> (help, add_arguments, run)); a module listed in
SUBCOMMAND_MODULES adds its own with `register(...)` from its `register_cli()`, which `main()` calls
before parsing (so `python -m fastdae compare ...` works without importing it at `import fastdae`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace, list[str]], int]
COMMANDS: dict[str, tuple[str, AddArguments, Run]] = {}


def register(name: str, help: str, add_arguments: AddArguments, run: Run) -> None:
    """Add a subcommand: add_arguments(parser) declares its options; run(args, extra) executes it,
    extra being the unparsed `--dotted.key value` overrides (the train command's config overrides)."""
    COMMANDS[name] = (help, add_arguments, run)


def parse_overrides(extra: list[str]) -> list[str]:
    """["--stage2.steps", "2000", "--mode=joint"] -> ["stage2.steps=2000", "mode=joint"]."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or len(item) == 2:
            raise SystemExit(f"fastdae: expected a --key value override, got {item!r}")
        key, sep, value = item[2:].partition("=")
        if not sep:
            if i + 1 >= len(extra):
                raise SystemExit(f"fastdae: override --{key} needs a value")
            i += 1
            value = extra[i]
        out.append(f"{key}={value}")
        i += 1
    return out


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (keys missing there come from --preset, else the defaults)")
    p.add_argument("--preset", help="named config: " + ", ".join(_preset_names()))
    p.add_argument("--out", help="run directory (config out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoints")


def _preset_names() -> list[str]:
    from fastdae.config import PRESETS

    return sorted(PRESETS)


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from fastdae.config import TrainConfig, apply_overrides, preset
    from fastdae.train import train

    base = preset(args.preset) if args.preset else TrainConfig()
    cfg = TrainConfig.load(args.config, base=base) if args.config else base
    overrides = parse_overrides(extra)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.resume:
        overrides.append("resume=true")
    try:
        cfg = apply_overrides(cfg, overrides)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"fastdae train: {e}") from None
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    print(f"run directory: {result.run_dir}")
    if result.sample_grid is not None:
        print(f"samples: {result.sample_grid}")
    if result.summary is not None:
        print(f"summary: {result.summary}")
    return 0


register("train", "run the DAE recipe (stage 1, cache, stage 2, prior, samples)", _train_arguments, _train)


SUBCOMMAND_MODULES = ("fastdae.compare", "fastdae.sampling", "fastdae.fid_score")  # each defines register_cli()


def main(argv: list[str] | None = None) -> int:
    import importlib

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register_cli()
    parser = argparse.ArgumentParser(prog="fastdae", description="Decoupled autoencoders with a latent cache")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help, description=help))
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return COMMANDS[args.command][2](args, extra)


if __name__ == "__main__":
    sys.exit(main())
