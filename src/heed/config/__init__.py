"""Validated configurations: one pydantic model per command, YAML files plus ``--set a.b=c`` overrides."""

from heed.config.base import (
    HeedConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
)

__all__ = [
    "HeedConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "config_from_dict",
    "load_config",
    "parse_overrides",
    "save_config",
]
