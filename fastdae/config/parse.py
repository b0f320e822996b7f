"""Building a config from dicts, YAML and `key.sub=value` overrides: every value parsed to its field's
declared type (no eval/exec), unknown keys refused.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, Union

from fastdae.config.checks import (
    CHOICES,
)
from fastdae.config.schema import (
    ConfigError,
    ConfigTypeError,
    TrainConfig,
    check_choice,
    did_you_mean,
)


def merge(base: dict[str, Any], d: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for k, v in d.items():
        if k not in base:
            raise ConfigError(f"unknown config key {where + k!r}{did_you_mean(k, base)}; known here: {sorted(base)}")
        out[k] = merge(base[k], v, f"{where}{k}.") if isinstance(base[k], dict) and isinstance(v, dict) else v
    return out


def build(cls: type, d: dict[str, Any], where: str) -> Any:
    kwargs = {}
    for name, tp in typing.get_type_hints(cls).items():
        if name not in d:
            continue
        value = d[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigTypeError(f"config key {where + name!r} must be a mapping, got {type(value).__name__}")
            value = build(tp, value, f"{where}{name}.")
        else:
            value = coerce(value, tp, where + name)
            if where + name in CHOICES:  # before the component's own check, to suggest the near miss
                check_choice(where + name, value, CHOICES[where + name])
        kwargs[name] = value
    if cls is TrainConfig:
        return cls(**kwargs)
    try:  # a component's own __post_init__ check, named by its key
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where.rstrip('.')}: {e}") from None


def coerce(value: Any, tp: Any, key: str, from_text: bool = True) -> Any:
    """Check (and convert where lossless: ints for float fields and, with from_text, strings from the
    command line) a value against a field type: bool, int, float, str, list[T], T | None, and a Literal
    of names as str (`build` then checks the name against CHOICES)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return coerce(value, type(args[0]), key, from_text)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, from_text)
    if origin is list:
        if isinstance(value, str) and from_text:
            # "a,b", "[a, b]" and JSON '["a", "b"]' all read as [a, b]
            value = [v.strip().strip("'\"") for v in value.strip().strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(f"config key {key!r} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]", from_text) for i, v in enumerate(value)]
    if isinstance(value, str) and from_text:
        value = value.strip()
        if tp is bool:
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"config key {key!r} expects a bool (true/false), got {value!r}")
        if tp in (int, float):
            try:
                return tp(value)
            except ValueError:
                raise ConfigError(f"config key {key!r} expects {tp.__name__}, got {value!r}") from None
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigTypeError(f"config key {key!r} expects {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict[str, Any]) -> TrainConfig:
    """Dotted overrides ("stage2.steps=2000" or {"stage2.steps": "2000"}) parsed to each field's type."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    nested: dict[str, Any] = {}
    for key, value in items:
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier override of {p!r}")
        node[leaf] = value
    return TrainConfig.from_dict(nested, base=cfg)


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    return key.strip(), value


def load_config(config: TrainConfig | dict[str, Any] | str | os.PathLike) -> TrainConfig:
    """A TrainConfig from itself, a (partial) dict over the defaults, or a YAML file path."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return TrainConfig.load(config)
    raise ConfigTypeError(f"config must be a TrainConfig, dict or YAML path, got {type(config).__name__}")
