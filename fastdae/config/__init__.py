"""The run configuration: one tree of dataclasses, round-tripping through dicts and YAML.

    cfg = preset("default")                                   # named configs (the README's main job)
    cfg = apply_overrides(cfg, ["stage2.steps=2000", "autoencoder.bottleneck=kl"])   # typed, dotted
    cfg = load_config("run.yaml")                             # or a dict, or a TrainConfig
    cfg.save("run/config.yaml"); TrainConfig.from_dict(cfg.to_dict()) == cfg

Component configs live next to their component (DataConfig in data/config.py, AutoencoderConfig in
models/autoencoder.py, DiscriminatorConfig in models/discriminator.py); this module nests them.
Overrides are parsed to the field's declared type (no eval/exec); unknown keys are errors.
Every value is validated when the config is built (`validate`): ranges, names (with "did you mean"
for near misses) and the cross-field rules (image size vs the autoencoder's downsampling and the
DiT's patch size). A `ConfigError` names the dotted key, what it must be and what it got.

One module per job: schema.py (the dataclasses, key names, ConfigError), checks.py (`validate`,
`check_environment`), parse.py (dicts, YAML, overrides, `load_config`), presets/ (small.py: the
CPU-sized presets; paper.py: the paper-scale ones).
"""

from fastdae.config.checks import CHOICES, check_environment, get_key, validate
from fastdae.config.parse import apply_overrides, coerce, load_config
from fastdae.config.presets import PRESETS, preset
from fastdae.config.schema import (
    LR_SCHEDULES,
    MODES,
    OBJECTIVES,
    OPTIMIZERS,
    POSTERIORS,
    PRECISIONS,
    SCHEDULES,
    STAGES,
    TIME_SAMPLINGS,
    AEStageConfig,
    CacheConfig,
    ConfigError,
    ConfigTypeError,
    OptimConfig,
    PriorConfig,
    Stage1Config,
    TrainConfig,
    check_choice,
    did_you_mean,
)

__all__ = [
    "AEStageConfig",
    "CHOICES",
    "CacheConfig",
    "ConfigError",
    "ConfigTypeError",
    "LR_SCHEDULES",
    "MODES",
    "OBJECTIVES",
    "OPTIMIZERS",
    "OptimConfig",
    "POSTERIORS",
    "PRECISIONS",
    "PRESETS",
    "PriorConfig",
    "SCHEDULES",
    "STAGES",
    "Stage1Config",
    "TIME_SAMPLINGS",
    "TrainConfig",
    "apply_overrides",
    "check_choice",
    "check_environment",
    "coerce",
    "did_you_mean",
    "get_key",
    "load_config",
    "preset",
    "validate",
]
