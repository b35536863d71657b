"""Random-number-generator states as JSON (never pickled), per rank."""

from __future__ import annotations

import base64
import random
from typing import cast

import torch


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng() -> dict:
    state = {"torch": _encode(torch.get_rng_state()), "python": _python_state_to_json(random.getstate())}
    if torch.cuda.is_initialized():   # (a CPU run on a GPU host never initialises CUDA)
        # CUDA-only branch: this rank's device only (the engine made it current). Saving every
        # visible device's state made a restore fail on a host that sees fewer GPUs.
        state["cuda"] = _encode(torch.cuda.get_rng_state())
    try:
        import numpy as np

        # numpy's global generator is the legacy MT19937 RandomState: get_state() gives its tuple form.
        legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
        kind, keys, pos, has_gauss, cached = legacy
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(_decode(state["torch"]))
    random.setstate(_python_state_from_json(state["python"]))
    if "cuda" in state and torch.cuda.is_initialized():
        saved = state["cuda"]
        if isinstance(saved, list):   # older checkpoints: every visible device's state, by index
            index = torch.cuda.current_device()
            saved = saved[index] if index < len(saved) else None
        if saved is not None:
            torch.cuda.set_rng_state(_decode(saved))   # the current device's generator
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _python_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_json(value: list) -> tuple:
    version, internal, gauss = value
    return version, tuple(internal), gauss
