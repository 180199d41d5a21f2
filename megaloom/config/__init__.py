"""Typed configuration: dataclasses, TOML files, `--set section.key=value` overrides, validation.

Every field has a docstring-like `help` in its metadata; `megaloom train --help-config` prints them.
Bad input raises `ConfigError` with one line naming the key, the value and the fix.

- schema.py      the sections (one dataclass per TOML table) and their keys
- files.py       load_config: defaults, TOML, overrides, coercion; to_toml, describe
- pretrained.py  what model.pretrained and peft.init decide (the model's shape, the adapter's settings)
- checks.py      validate: every rule, before anything is built
"""

from megaloom.config.checks import layout_spec, validate
from megaloom.config.files import coerce, describe, load_config, parse_override, read_toml, set_value, to_dict, to_toml
from megaloom.config.pretrained import PEFT_METHODS, PEFT_TARGETS, apply_peft_init, apply_pretrained
from megaloom.config.schema import (
                                    SECTIONS,
                                    SWITCHABLE_PEFT,
                                    CheckpointConfig,
                                    Config,
                                    DataConfig,
                                    DistillConfig,
                                    DPOConfig,
                                    FaultsConfig,
                                    LogConfig,
                                    ModelConfig,
                                    ParallelConfig,
                                    PeftConfig,
                                    QATConfig,
                                    RewardConfig,
                                    RLConfig,
                                    TrainConfig,
                                    get_value,
                                    keys_of,
)
from megaloom.errors import ConfigError

__all__ = ["SECTIONS", "SWITCHABLE_PEFT", "PEFT_METHODS", "PEFT_TARGETS", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "DistillConfig", "DPOConfig", "FaultsConfig", "LogConfig", "ModelConfig", "ParallelConfig",
           "PeftConfig", "QATConfig", "RewardConfig", "RLConfig", "TrainConfig", "apply_peft_init", "apply_pretrained",
           "coerce", "describe", "get_value", "keys_of", "layout_spec", "load_config", "parse_override", "read_toml",
           "set_value", "to_dict", "to_toml", "validate"]
