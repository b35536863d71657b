"""Typed hf_zero configuration with DeepSpeed's key names."""

from hf_zero.config.batch import resolve_batch_sizes
from hf_zero.config.parse import ConfigError, config_to_dict, load_config, read_config_dict
from hf_zero.config.schema import AUTO, HfZeroConfig

__all__ = ["AUTO", "ConfigError", "HfZeroConfig", "config_to_dict", "load_config", "read_config_dict",
           "resolve_batch_sizes"]
