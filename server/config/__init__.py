"""Configuration: the schema (schema.py, frozen dataclasses) and its loading from defaults < TOML
< `MICROBATCH_*` variables < CLI flags (loading.py). What the rest of the server imports.

Main thread at start-up; no torch, no aiohttp.
"""

from server.config.loading import load_config, parse_model_flag
from server.config.schema import (
    BUILTIN_MODELS,
    DEFAULT_MODELS,
    FORMATS,
    HALF_PRECISIONS,
    LOG_LEVELS,
    ON_MODEL_FAILURE,
    ROUTINGS,
    BatchingConfig,
    Config,
    ConfigError,
    DevicesConfig,
    Flags,
    ModelConfig,
    Placement,
    ServerSettings,
    WorkersConfig,
)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODELS",
    "FORMATS",
    "HALF_PRECISIONS",
    "LOG_LEVELS",
    "ON_MODEL_FAILURE",
    "ROUTINGS",
    "BatchingConfig",
    "Config",
    "ConfigError",
    "DevicesConfig",
    "Flags",
    "ModelConfig",
    "Placement",
    "ServerSettings",
    "WorkersConfig",
    "load_config",
    "parse_model_flag",
]
