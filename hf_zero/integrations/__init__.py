"""Thin adapters to the Hugging Face stack: the Trainer, accelerate, peft, ``hf-zero launch``.

Nothing here shards anything (that is the engine's job), and nothing is imported eagerly:
``import hf_zero`` must not pull in transformers or accelerate.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ZeroTrainingArguments": "hf_zero.integrations.trainer",
    "HfZeroTrainer": "hf_zero.integrations.trainer",
    "HfZeroTrainerMixin": "hf_zero.integrations.trainer",
    "prepare_accelerate": "hf_zero.integrations.accelerate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        import importlib.util

        # accelerate is an optional dependency (pyproject.toml); transformers' Trainer needs it too.
        if importlib.util.find_spec("accelerate") is None:
            raise ImportError(f"hf_zero.{name} needs accelerate, an optional dependency of hf_zero: "
                              "pip install 'hf_zero[accelerate]'")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_zero.integrations' has no attribute '{name}'")
