"""``model.state_dict()`` and ``model.save_pretrained`` on a model hf_zero shards in place at stage 3.

Stage 3 leaves each parameter empty between uses, so torch's ``state_dict`` and transformers'
``save_pretrained`` would return or write ``torch.Size([0])`` tensors. Instead, on the engine's
model and each of its submodules:

- ``state_dict()`` (``keep_vars=False``, the default) gathers the released parameters one
  group (unit) at a time, copies each out to the host (one copy per tied parameter, shared by
  its names, as torch's entries share storage) and releases the group again: the result has
  torch's key set (tied names and persistent buffers included) with full tensors in the dtype
  the module holds, equal to an unsharded model's ``state_dict()``. Gathered parameters are
  CPU copies; persistent parameters and buffers are returned as torch returns them. Every rank
  must call it, as with DeepSpeed; peft's ``get_peft_model_state_dict(model)`` goes through it
  (and so gathers the frozen base too: ``model.save_pretrained`` writes the adapter alone).
  ``state_dict(keep_vars=True)`` returns the live parameters, empty between uses, as before.
- ``save_pretrained(dir, is_main_process=...)`` (what ``accelerator.unwrap_model(model)
  .save_pretrained(...)`` calls) is routed to ``engine.save_16bit_model``, which gathers one
  output file at a time and writes save_pretrained's layout from rank 0; every rank calls it.
  A call with an explicit ``state_dict=`` (``state_dict=accelerator.get_state_dict(model)``) goes
  to transformers, which drops tied duplicates and reverts its conversions itself; meanwhile
  ``num_parameters()`` counts the full shapes, for the index's ``total_parameters``. Options
  the export lacks (``variant``, ``push_to_hub``, ...) go to transformers too, with the
  gathered ``state_dict()`` (``_EXPORT_KWARGS``): never dropped.

Both first check that every rank entered the call (presence.py's [Note: presence check]): a call
made on some ranks only (``if rank == 0: model.save_pretrained(d)``) raises there after
``presence_timeout`` seconds, naming the absent ranks and what to call instead, rather than
waiting in its first gather. hf_zero's own reads of the structure
(:func:`released_state_dict_allowed`) neither gather nor check.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast

import torch

from hf_zero.comm import Collectives
from hf_zero.gathered import GatheredParameters
from hf_zero.presence import all_ranks_call
from hf_zero.sharded_params import sharded_group_of

if TYPE_CHECKING:
    from hf_zero.engine import ZeroEngine

_released_allowed = 0   # > 0 inside hf_zero's own reads of the state dict structure
_calls = threading.local()   # .stack: (module, prefix) of the state_dict() calls in progress

GATHER_INSTEAD = ("Or gather on every rank: `with hf_zero.GatheredParameters(list(model.parameters())): ...`, or save "
                  "with model.save_pretrained(dir, is_main_process=rank == 0) / engine.save_16bit_model(dir) called "
                  "on every rank (rank 0 writes).")


@contextlib.contextmanager
def released_state_dict_allowed() -> Iterator[None]:
    """hf_zero's internal state_dict() calls that read names/structure, not released values."""
    global _released_allowed
    _released_allowed += 1
    try:
        yield
    finally:
        _released_allowed -= 1


def _is_released(p: torch.Tensor) -> bool:
    return sharded_group_of(p) is not None and p.numel() == 0 and getattr(p, "ds_numel", 0) > 0


def _stack() -> list:
    if not hasattr(_calls, "stack"):
        _calls.stack = []
    return _calls.stack


def _is_child_call(parent: tuple, module: torch.nn.Module, prefix: str) -> bool:
    """torch's state_dict() recursion: ``module`` is a child of the call in progress."""
    parent_module, parent_prefix = parent
    return any(child is module and prefix == f"{parent_prefix}{name}."
               for name, child in parent_module._modules.items())


def _enter_state_dict(module: torch.nn.Module, prefix: str, keep_vars: bool) -> None:
    stack = _stack()
    if stack and not _is_child_call(stack[-1], module, prefix):
        stack.clear()   # left over from a state_dict() that raised part-way: this is a new call
    stack.append((module, prefix))


def _state_dict_post_hook(root: torch.nn.Module, comm: Collectives) -> Callable:
    def fill_released(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        stack = _stack()
        if stack and stack[-1][0] is module and stack[-1][1] == prefix:
            stack.pop()
        else:
            stack.clear()
        if stack or _released_allowed:
            return   # the outermost call fills the whole dict (one gather per group)
        # torch's keys: the call's prefix + the dotted local name (tied names included)
        entries = [(prefix + name, p) for name, p in module.named_parameters(remove_duplicate=False)
                   if _is_released(p) and _empty_value(state_dict.get(prefix + name))]
        if entries:
            call = "model.state_dict()" if module is root else f"{type(module).__name__}.state_dict()"
            with all_ranks_call(comm, call, GATHER_INSTEAD):
                _gather_into(state_dict, entries)

    return fill_released


def _empty_value(value: Any) -> bool:
    """A detached empty entry (keep_vars=True entries are the parameters themselves: left as they are)."""
    return isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.numel() == 0


def _gather_into(state_dict: dict, entries: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Gather each group once, in the entries' order (the same on every rank), copy its
    parameters to the host and release it: at most one group is gathered at a time."""
    by_group: dict[int, list] = {}
    for name, p in entries:
        by_group.setdefault(id(sharded_group_of(p)), []).append((name, p))
    copies: dict[int, torch.Tensor] = {}   # tied parameters: one copy shared by their names
    for members in by_group.values():
        with GatheredParameters([p for _, p in members]):   # one group
            for name, p in members:
                if id(p) not in copies:
                    copies[id(p)] = p.detach().to("cpu", copy=True)
                state_dict[name] = copies[id(p)]


@contextlib.contextmanager
def _true_parameter_count(module: torch.nn.Module) -> Iterator[None]:
    """``module.num_parameters()`` counts the full shapes meanwhile: transformers' save_pretrained
    writes it into the index as ``total_parameters``, and released parameters have ``numel() == 0``."""
    original = getattr(module, "num_parameters", None)
    if original is None:
        yield
        return

    def num_parameters(*args: Any, **kwargs: Any) -> int:
        if args or kwargs:   # filtered counts: transformers' own (not used by save_pretrained)
            return original(*args, **kwargs)
        return sum(int(getattr(p, "ds_numel", 0)) or p.numel() for p in module.parameters())   # deduplicated

    setattr(module, "num_parameters", num_parameters)
    try:
        yield
    finally:
        module.__dict__.pop("num_parameters", None)


# save_pretrained keywords the export honours: the rest go to transformers with a gathered
# state dict. save_function only chooses how transformers writes non-safetensors files, which
# the export never writes (accelerate's scripts pass accelerator.save).
_EXPORT_KWARGS = {"is_main_process", "max_shard_size", "safe_serialization", "save_function"}


def install_save_hooks(engine: "ZeroEngine", comm: Collectives) -> Callable[[], None]:
    """Gather in ``state_dict`` and route ``save_pretrained`` on ``engine.module`` (stage 3);
    ``comm``: the engine's data-parallel group (its presence timeout included). Returns the undo."""
    module = engine.module
    # Stages 0-2 hold whole parameters: torch's state_dict and transformers' save_pretrained
    # are right as they are and may be called on rank 0 alone, as in a DDP script.
    if engine.zero_optimization_stage() != 3:
        return lambda: None
    post = _state_dict_post_hook(module, comm)
    # every submodule: a submodule's state_dict() is an outermost call of its own
    handles = [h for m in module.modules()
               for h in (m.register_state_dict_pre_hook(_enter_state_dict), m.register_state_dict_post_hook(post))]
    # (a peft model writes its adapter: save_16bit_model gathers the adapter and calls peft)
    routed = hasattr(module, "save_pretrained")
    if routed:
        original = cast(Callable[..., None], module.save_pretrained)   # transformers' or peft's method

        def save_pretrained(save_directory: Any, *args: Any, state_dict: Any = None, **kwargs: Any) -> None:
            if state_dict is not None:   # the caller gathered: transformers / peft write it as given
                with _true_parameter_count(module):   # the index's total_parameters
                    return original(save_directory, *args, state_dict=state_dict, **kwargs)
            with all_ranks_call(comm, "model.save_pretrained()", GATHER_INSTEAD):
                if args or set(kwargs) - _EXPORT_KWARGS or kwargs.get("safe_serialization") is False:
                    # options hf_zero's writer does not have (variant, push_to_hub, peft's
                    # selected_adapters, ...): transformers / peft write the gathered state dict
                    # (the whole model in host memory on every rank) themselves
                    with _true_parameter_count(module):
                        return original(save_directory, *args, state_dict=module.state_dict(), **kwargs)
                shard = {"max_shard_size": kwargs["max_shard_size"]} if "max_shard_size" in kwargs else {}
                engine.save_16bit_model(str(save_directory), is_main_process=kwargs.get("is_main_process", True),
                                        **shard)

        setattr(module, "save_pretrained", save_pretrained)   # an instance attribute: undo pops it

    def undo() -> None:
        for handle in handles:
            handle.remove()
        if routed:
            module.__dict__.pop("save_pretrained", None)

    return undo
