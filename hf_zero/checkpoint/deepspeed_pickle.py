"""Read DeepSpeed's pickled checkpoint files without executing them and without DeepSpeed.

[Note: allow-listed unpickling of DeepSpeed checkpoints]
A ``.pt`` file is a pickle: loading it the usual way can run any code the file names. hf_zero
reads DeepSpeed checkpoints only with ``torch.load(weights_only=True)``, whose unpickler
accepts tensors, containers and primitive values, plus exactly the globals listed in
``ALLOWED``. DeepSpeed stores three classes of its own (seen in DeepSpeed 0.19 checkpoints of
stages 1-3, fp32/bf16/fp16, ``tests/data/deepspeed_ckpts``):

- ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` / ``DynamicLossScaler``: an object whose
  attributes (``cur_scale``, ``cur_iter``, ...) are restored into a plain stand-in here;
- ``deepspeed.runtime.zero.config.ZeroStageEnum``: an int enum, read as a plain int;
- ``deepspeed.utils.tensor_fragment.fragment_address``: (numel, start) of a parameter inside
  a rank's partition, restored into a stand-in.

The stand-ins are hf_zero classes registered under DeepSpeed's names, so DeepSpeed need not
be installed and none of its code runs. Any other global is refused with an error naming it.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from hf_zero.checkpoint.files import CheckpointError


class StoredObject:
    """Attributes of a pickled DeepSpeed object, restored as plain data (no methods run)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({vars(self)})"


class LossScalerState(StoredObject):
    """DeepSpeed's static ``LossScaler``: ``cur_scale``."""


class DynamicLossScalerState(StoredObject):
    """DeepSpeed's ``DynamicLossScaler``: ``cur_scale``, ``cur_iter``, ``last_overflow_iter``,
    ``cur_hysteresis``, ``scale_window``, ..."""


class FragmentAddress(StoredObject):
    """DeepSpeed's ``fragment_address``: ``numel`` and ``start`` inside a rank's partition."""


class ZeroStage(int):
    """DeepSpeed's ``ZeroStageEnum`` member, as its integer value."""


ALLOWED: dict[str, Any] = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": LossScalerState,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": DynamicLossScalerState,
    "deepspeed.runtime.zero.config.ZeroStageEnum": ZeroStage,
    "deepspeed.utils.tensor_fragment.fragment_address": FragmentAddress,
}

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_deepspeed_file(path: Path) -> dict:
    """The dict stored in one DeepSpeed checkpoint file, tensors on the CPU (memory-mapped
    where the file format allows); refuses globals outside ``ALLOWED``, naming them."""
    if not path.is_file():
        raise CheckpointError(f"missing DeepSpeed checkpoint file: {path}")
    mmap = zipfile.is_zipfile(path)   # the legacy (non-zip) format cannot be memory-mapped
    try:
        with torch.serialization.safe_globals([(cls, name) for name, cls in ALLOWED.items()]):
            value = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found and found.group(1) not in ALLOWED:
            raise CheckpointError(
                f"{path}: refusing to unpickle '{found.group(1)}': hf_zero reads DeepSpeed checkpoints "
                f"without running code from them and allows only tensors, containers and "
                f"{sorted(ALLOWED)}. If this file comes from a newer DeepSpeed, please report the global; "
                "if you do not know where it comes from, do not load it with pickle at all") from None
        raise CheckpointError(f"{path}: not a readable DeepSpeed checkpoint file: {err}") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: corrupted or truncated DeepSpeed checkpoint file: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(value).__name__}; not a DeepSpeed checkpoint")
    return value
