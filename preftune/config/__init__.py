"""Typed configuration: recipe YAML + dotted overrides -> dataclasses, every key and value checked before any
model loads (an unknown key names the closest valid one, a bad value names the key and what is allowed)."""

from .checks import validate, validate_loop
from .recipe import (
    beside,
    config_from_dict,
    describe_options,
    load_config,
    load_section,
    load_yaml,
    parse_overrides,
    parse_yaml,
    save_config,
    to_dict,
    with_objective,
)
from .sections import (
    Config,
    ConfigError,
    DataConfig,
    LoopConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    ReferenceConfig,
    TrainingConfig,
)
from .typed import build_section

__all__ = ["Config", "ConfigError", "DataConfig", "LoopConfig", "LoraConfig", "ModelConfig", "ObjectiveConfig",
           "ReferenceConfig", "TrainingConfig", "beside", "build_section", "config_from_dict", "describe_options",
           "load_config", "load_section", "load_yaml", "parse_overrides", "parse_yaml", "save_config", "to_dict",
           "validate", "validate_loop", "with_objective"]
