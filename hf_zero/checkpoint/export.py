"""Write a live model in Hugging Face layout: the files ``save_pretrained`` would write.

transformers models go through ``HfLayout`` (hf_layout.py: save_pretrained's own tied-weight
removal, weight-conversion revert and shard plan, on meta tensors); their values are gathered
one output file at a time (a collective every rank takes part in under stage 3; a no-op at
stages 0-2), so no rank ever holds the whole model, and rank 0 writes. peft models write their
(small) adapter through peft's own ``save_pretrained`` with the adapter's groups gathered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, cast

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from hf_zero.checkpoint.hf_layout import HfLayout, is_transformers_model
from hf_zero.checkpoint.layout import true_shape
from hf_zero.checkpoint.model_hooks import GATHER_INSTEAD, released_state_dict_allowed
from hf_zero.comm import Collectives, rank_local_step
from hf_zero.gathered import GatheredParameters
from hf_zero.presence import all_ranks_call
from hf_zero.checkpoint.safetensors_io import write_safetensors
from hf_zero.sharded_params import sharded_group_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def save_model_hf(module: torch.nn.Module, save_dir: str | Path, dtype: torch.dtype, is_writer: bool,
                  max_shard_size: int | str = "50GB", comm: Optional[Collectives] = None) -> None:
    """Write ``module``; with ``comm`` a failure on the writing rank is every rank's error, and a
    call that some rank did not make raises on the others (presence.py's [Note: presence check])."""
    with all_ranks_call(comm or Collectives(None), "engine.save_16bit_model()", GATHER_INSTEAD):
        _save_model_hf(module, Path(save_dir), dtype, is_writer, max_shard_size, comm)


def _save_model_hf(module: torch.nn.Module, save_dir: Path, dtype: torch.dtype, is_writer: bool,
                   max_shard_size: int | str, comm: Optional[Collectives]) -> None:
    if getattr(module, "peft_config", None) is not None:
        # Only the adapter is written (peft's save_pretrained, at every stage): at stage 3 gather
        # the trainable groups, never the frozen base.
        with GatheredParameters([p for p in module.parameters() if p.requires_grad]):
            with rank_local_step(comm or Collectives(None), f"writing the adapter to {save_dir}"):
                if is_writer:
                    _save_pretrained(module, save_dir, dtype)
        return
    if is_transformers_model(module):
        _save_transformers_layout(module, save_dir, dtype, is_writer, max_shard_size, comm)
        return
    if any(sharded_group_of(p) is not None for p in module.parameters()):
        _save_sharded_stage3(module, save_dir, dtype, is_writer, max_shard_size)
        return
    with rank_local_step(comm or Collectives(None), f"writing the model to {save_dir}"):
        if is_writer:
            _save_pretrained(module, save_dir, dtype)


def _host_copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype, copy=True)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()


def _save_transformers_layout(module: PreTrainedModel, save_dir: Path, dtype: torch.dtype, is_writer: bool,
                              max_shard_size: int | str, comm: Optional[Collectives]) -> None:
    entries = module.state_dict(keep_vars=True)   # parameters and persistent buffers, tied names included
    shapes = {n: true_shape(t) for n, t in entries.items()}
    dtypes = {n: dtype if t.is_floating_point() else t.dtype for n, t in entries.items()}
    layout = HfLayout(module, shapes, dtypes, max_shard_size)

    def values_for(names: list[str]) -> dict[str, torch.Tensor] | None:
        with GatheredParameters([entries[n] for n in names]):
            # host copies, one copy each: the gathered device memory is released with the group
            return {n: _host_copy(entries[n], dtype) for n in names} if is_writer else None

    with rank_local_step(comm or Collectives(None), f"preparing {save_dir}"):
        if is_writer:
            save_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_shards(save_dir, set(layout.plan.filename_to_tensors))
    layout.write(save_dir, values_for, dtype, is_writer, comm)


def _remove_stale_shards(save_dir: Path, keep: set[str]) -> None:
    """As save_pretrained: shard files of an earlier, differently sharded save are removed."""
    for old in save_dir.glob("model-*-of-*.safetensors"):
        if old.name not in keep:
            old.unlink()


def _save_pretrained(module: torch.nn.Module, save_dir: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    save_dir.mkdir(parents=True, exist_ok=True)
    with released_state_dict_allowed():   # peft keeps only the (gathered) adapter entries
        state = {k: _cast(v, dtype) for k, v in module.state_dict().items()}
    if hasattr(module, "save_pretrained"):
        # transformers/peft handle tied weights, weight-name conversion and adapter filtering
        save_pretrained = cast(Callable[..., None], module.save_pretrained)   # transformers' or peft's
        save_pretrained(save_dir, state_dict=state, safe_serialization=True)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(save_dir / "model.safetensors"))


def _save_sharded_stage3(module: torch.nn.Module, save_dir: Path, dtype: torch.dtype, is_writer: bool,
                         max_shard_size: int | str) -> None:
    named = dict(module.named_parameters())   # deduplicated: a tied head is written once
    meta = {n: torch.empty(true_shape(p), dtype=dtype, device="meta") for n, p in named.items()}
    plan = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                              max_shard_size=max_shard_size)
    if is_writer:
        save_dir.mkdir(parents=True, exist_ok=True)
    for filename, names in plan.filename_to_tensors.items():
        with GatheredParameters([named[name] for name in names]):
            shard = {name: _host_copy(named[name], dtype) for name in names} if is_writer else {}
        if is_writer:
            write_safetensors(save_dir / filename, shard, metadata={"format": "pt"})
    if is_writer:
        if plan.is_sharded:
            index = {"metadata": dict(plan.metadata), "weight_map": plan.tensor_to_filename}
            (save_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.architectures = [type(module).__name__]
            config.save_pretrained(save_dir)
