"""hf_zero: ZeRO data parallelism for the Hugging Face stack."""

from hf_zero.config import AUTO, ConfigError, HfZeroConfig, load_config
from hf_zero.checkpoint import CheckpointError, consolidate
from hf_zero.presence import RanksAbsent
from hf_zero.engine import ZeroEngine, initialize
from hf_zero.gathered import GatheredParameters
from hf_zero.meta_init import from_pretrained, zero_init
from hf_zero.stages.stage3_units import set_z3_leaf_modules

__version__ = "0.1.0"

__all__ = ["AUTO", "CheckpointError", "ConfigError", "GatheredParameters", "HfZeroConfig", "HfZeroTrainer",
           "HfZeroTrainerMixin", "RanksAbsent", "ZeroEngine", "ZeroTrainingArguments", "__version__", "consolidate",
           "from_pretrained", "initialize", "load_config", "prepare_accelerate", "set_z3_leaf_modules", "zero_init"]

_INTEGRATIONS = ("HfZeroTrainer", "HfZeroTrainerMixin", "ZeroTrainingArguments", "prepare_accelerate")


def __getattr__(name: str):
    # Lazy: importing hf_zero must not import transformers / accelerate.
    if name in _INTEGRATIONS:
        from hf_zero import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module 'hf_zero' has no attribute '{name}'")
