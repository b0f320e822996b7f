"""Named configs: the CPU-sized ones (`default`, `vq`, `tiny`: small.py) and the paper-scale ones
(`imagenet256-kl`, `imagenet256-kl-b2`, `imagenet256-vq`, `ffhq256-vq`: paper.py, with the published
recipes they follow). `python -m fastdae plan --preset NAME` estimates what a preset costs on GPUs.
"""

from __future__ import annotations

from collections.abc import Callable

from fastdae.config.presets.paper import PAPER
from fastdae.config.presets.small import SMALL
from fastdae.config.schema import ConfigError, TrainConfig, did_you_mean

PRESETS: dict[str, Callable[[], TrainConfig]] = {**SMALL, **PAPER}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
