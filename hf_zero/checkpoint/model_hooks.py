"""``model.save_pretrained`` and ``model.state_dict`` on a model hf_zero shards in place.

Stage 3 leaves each parameter empty between uses, so transformers' ``save_pretrained`` and
torch's ``state_dict`` would write or return ``torch.Size([0])`` tensors. Under stage 3 the
engine routes ``model.save_pretrained(dir, is_main_process=...)`` (what
``accelerator.unwrap_model(model).save_pretrained(...)`` calls on every rank) to
``engine.save_16bit_model``, which gathers one output file at a time and writes
save_pretrained's layout from rank 0: every rank must call it, as with DeepSpeed's
``save_16bit_model`` (a call on one rank alone waits for the others in the first gather). A
call with an explicit ``state_dict=`` goes to transformers unchanged. ``state_dict()`` cannot gather (it may be
called on one rank only, and every rank would need the whole model), so while any parameter is
released it raises, saying what to call instead.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from hf_zero.sharded_params import sharded_group_of

if TYPE_CHECKING:
    from hf_zero.engine import ZeroEngine

_released_allowed = 0   # > 0 inside hf_zero's own reads of the state dict structure


@contextlib.contextmanager
def released_state_dict_allowed() -> Iterator[None]:
    """hf_zero's internal state_dict() calls that read names/structure, not released values."""
    global _released_allowed
    _released_allowed += 1
    try:
        yield
    finally:
        _released_allowed -= 1


def _refuse_released(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    if _released_allowed:
        return
    for name, p in module.named_parameters(remove_duplicate=False):
        value = state_dict.get(prefix + name)
        released = sharded_group_of(p) is not None and p.numel() == 0 and getattr(p, "ds_numel", 0) > 0
        if released and value is not None and not isinstance(value, torch.nn.Parameter):
            raise RuntimeError(
                f"model.state_dict() on a model sharded by hf_zero stage 3 would return an empty tensor for "
                f"'{prefix + name}'. On every rank, call it inside `with hf_zero.GatheredParameters("
                "list(model.parameters())):`, or save with engine.save_16bit_model(dir) / model.save_pretrained(dir) "
                "(gathers one output file at a time; rank 0 writes), or use accelerator.get_state_dict(model)")


def install_save_hooks(engine: "ZeroEngine") -> Callable[[], None]:
    """Route ``save_pretrained`` and guard ``state_dict`` on ``engine.module``; returns the undo."""
    module = engine.module
    handle = module.register_state_dict_post_hook(_refuse_released)
    # Stages 0-2 hold whole parameters: transformers' own save_pretrained writes the same layout
    # and may be called on rank 0 alone, as in a DDP script; only stage 3 needs every rank.
    # (a peft model writes its adapter: save_16bit_model gathers the adapter and calls peft)
    routed = engine.zero_optimization_stage() == 3 and hasattr(module, "save_pretrained")
    if routed:
        original = module.save_pretrained

        def save_pretrained(save_directory: Any, *args: Any, state_dict: Any = None, **kwargs: Any) -> None:
            if state_dict is not None:   # the caller gathered: transformers / peft write it as given
                return original(save_directory, *args, state_dict=state_dict, **kwargs)
            # save_function / safe_serialization do not apply: safetensors are written by rank 0
            engine.save_16bit_model(str(save_directory), max_shard_size=kwargs.get("max_shard_size", "50GB"),
                                    is_main_process=kwargs.get("is_main_process", True))

        module.save_pretrained = save_pretrained

    def undo() -> None:
        handle.remove()
        if routed:
            module.__dict__.pop("save_pretrained", None)

    return undo
