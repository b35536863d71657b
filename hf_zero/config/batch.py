"""DeepSpeed's batch-size invariant: train_batch = micro x accumulation x data-parallel world."""

from __future__ import annotations

import dataclasses
import typing

from hf_zero.config.schema import AUTO

if typing.TYPE_CHECKING:
    from hf_zero.config.schema import HfZeroConfig

_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_batch_invariant_static(config: "HfZeroConfig") -> list[tuple[str, str]]:
    """Checks that need no world size: train_batch must be a multiple of micro x GA."""
    train, micro, accum = (getattr(config, k) for k in _KEYS)
    if all(isinstance(v, int) for v in (train, micro, accum)) and train % (micro * accum):
        return [("train_batch_size", f"{train} is not a multiple of train_micro_batch_size_per_gpu "
                 f"({micro}) x gradient_accumulation_steps ({accum})")]
    return []


def resolve_batch_sizes(config: "HfZeroConfig", world_size: int) -> "HfZeroConfig":
    """Fill the missing one(s) of the three batch keys the way DeepSpeed does, or raise.

    Only micro given -> accumulation 1. Neither train_batch nor micro given -> error.
    """
    from hf_zero.config.parse import ConfigError

    values = {k: getattr(config, k) for k in _KEYS}
    autos = [k for k, v in values.items() if v == AUTO]
    if autos:
        raise ConfigError([(k, "is still 'auto'; an integration (Trainer/accelerate) must resolve it "
                            "or give a number") for k in autos])
    train, micro, accum = (values[k] for k in _KEYS)
    if train is None and micro is None:
        raise ConfigError([("train_micro_batch_size_per_gpu",
                            "either train_batch_size or train_micro_batch_size_per_gpu must be given")])
    if micro is None:
        accum = accum or 1
        micro, rest = divmod(train, accum * world_size)
        if rest or micro == 0:
            raise ConfigError([("train_batch_size", f"{train} is not divisible by gradient_accumulation_steps "
                                f"({accum}) x world size ({world_size})")])
    elif accum is None:
        if train is None:
            accum = 1
        else:
            accum, rest = divmod(train, micro * world_size)
            if rest or accum == 0:
                raise ConfigError([("train_batch_size", f"{train} is not divisible by "
                                    f"train_micro_batch_size_per_gpu ({micro}) x world size ({world_size})")])
    expected = micro * accum * world_size
    if train is not None and train != expected:
        raise ConfigError([("train_batch_size", f"{train} != train_micro_batch_size_per_gpu ({micro}) x "
                            f"gradient_accumulation_steps ({accum}) x world size ({world_size}) = {expected}")])
    return dataclasses.replace(config, train_batch_size=expected, train_micro_batch_size_per_gpu=micro,
                               gradient_accumulation_steps=accum)
