"""The file layout ``save_pretrained`` would write, planned without materialising the model.

[Note: writing save_pretrained's layout shard by shard]
``PreTrainedModel.save_pretrained`` takes the state dict, drops ``_keys_to_ignore_on_save`` and
tied duplicates (``remove_tied_weights_from_state_dict``), reverts the load-time weight
conversions (``revert_weight_conversion``: fused MoE experts back to per-expert keys, renamed
keys back to their checkpoint names), plans files with ``split_torch_state_dict_into_shards``
and writes ``config.json``, ``generation_config.json`` and the index. ``HfLayout`` runs those
same transformers functions on *meta* tensors of the true shapes, so the plan costs no memory.
To fill one output file it then needs the values of the in-memory tensors that produce its
keys: each in-memory tensor is reverted alone (on meta) to learn which output keys it makes,
and a file's values are made by reverting just the tensors it needs. The caller gathers
(stage 3) or reads (consolidation) those tensors, one output file at a time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, TypeGuard, Union, cast

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory

from hf_zero.checkpoint.safetensors_io import write_safetensors
from hf_zero.comm import Collectives, agree_on_failure

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def is_transformers_model(module: torch.nn.Module) -> TypeGuard[PreTrainedModel]:
    return hasattr(module, "base_model_prefix") and hasattr(module, "config") and hasattr(module, "save_pretrained")


class HfLayout:
    """Output files, keys and their in-memory sources for ``model`` (a transformers model; may be
    meta-built) whose state dict entries are ``shapes`` (name -> shape; tied duplicates may be
    present or not)."""

    def __init__(self, model: PreTrainedModel, shapes: dict[str, list[int]], dtypes: dict[str, torch.dtype],
                 max_shard_size: Union[int, str] = "50GB"):
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        self.model = model
        ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
        meta = {n: torch.empty(s, dtype=dtypes[n], device="meta") for n, s in shapes.items() if n not in ignored}
        meta = remove_tied_weights_from_state_dict(meta, model)
        self.kept = list(meta)
        self.sources: dict[str, list[str]] = {}   # output key -> in-memory names making it
        for name, tensor in meta.items():
            for key in revert_weight_conversion(model, {name: tensor}):
                self.sources.setdefault(key, []).append(name)
        reverted = revert_weight_conversion(model, dict(meta))
        if set(reverted) != set(self.sources):
            # a conversion that needs several in-memory tensors at once: not planned per tensor
            odd = sorted(set(reverted) ^ set(self.sources))[:5]
            raise NotImplementedError(f"hf_zero cannot stream the export of {type(model).__name__}: its weight "
                                      f"conversion mixes several parameters into one saved tensor ({odd})")
        self._reverted = reverted   # keeps the meta bases alive: their ids are storage ids below
        self.plan = split_state_dict_into_shards_factory(
            reverted, get_storage_size=_meta_storage_bytes, get_storage_id=_meta_storage_id,
            filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)

    def needed(self, filename: str) -> list[str]:
        """In-memory names whose values the output file ``filename`` is made from (model order)."""
        wanted = {n for key in self.plan.filename_to_tensors[filename] for n in self.sources[key]}
        return [n for n in self.kept if n in wanted]

    def file_tensors(self, filename: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of output file ``filename`` from the values of ``needed(filename)``."""
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(self.model, values)
        return {key: reverted[key].contiguous() for key in self.plan.filename_to_tensors[filename]}

    def write(self, out_dir: Path, values_for: Callable[[list[str]], Optional[dict[str, torch.Tensor]]],
              dtype: torch.dtype, is_writer: bool = True, comm: Optional[Collectives] = None) -> None:
        """Write every file; ``values_for(names)`` returns those tensors (None on non-writing ranks,
        which still call it: stage 3 gathers there). A write that fails (a full disk) stops the
        writing, not the gathering, so the other ranks are not left waiting; with ``comm`` every
        rank then raises the same error (comm.agree_on_failure)."""
        error: Optional[Exception] = None
        for filename in self.plan.filename_to_tensors:
            values = values_for(self.needed(filename))
            if is_writer and error is None:
                try:
                    assert values is not None   # values_for's contract on the writing rank
                    write_safetensors(out_dir / filename, self.file_tensors(filename, values),
                                      metadata={"format": "pt"})
                except Exception as err:   # held until every rank has taken part in every gather
                    error = err
            del values   # one output file in memory at a time
        if is_writer and error is None:
            try:
                self.write_metadata(out_dir, dtype)
            except Exception as err:
                error = err
        if comm is not None:
            agree_on_failure(comm, error, f"writing the model to {out_dir}")
        elif error is not None:
            raise error

    def write_metadata(self, out_dir: Path, dtype: torch.dtype) -> None:
        """The index (as save_pretrained writes it), config.json and generation_config.json."""
        if self.plan.is_sharded:
            total = sum(int(torch.Size(s).numel()) for s in _parameter_shapes(self.model))
            index = {"metadata": {"total_parameters": total, **self.plan.metadata},
                     "weight_map": self.plan.tensor_to_filename}
            (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = self.model.config
        config.dtype = str(dtype).split(".")[1]
        config.architectures = [type(self.model).__name__]
        config.save_pretrained(out_dir)
        if self.model.can_generate() and getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(out_dir)


# save_pretrained plans files with huggingface_hub, which keeps tensors sharing a storage (the
# per-expert views a reverted fused tensor becomes) in one file and counts that storage once.
# On meta tensors the same sharing shows as a common ``_base``.
def _meta_storage_id(tensor: torch.Tensor) -> int:
    return id(tensor._base if tensor._base is not None else tensor)


def _meta_storage_bytes(tensor: torch.Tensor) -> int:
    base = tensor._base if tensor._base is not None else tensor
    return base.numel() * base.element_size()


def _parameter_shapes(model: torch.nn.Module) -> Iterable[list[int]]:
    for p in model.parameters():   # deduplicated, as model.num_parameters() counts
        yield getattr(p, "ds_shape", None) or list(p.shape)


def meta_model(model_class: str, config: dict) -> Optional[PreTrainedModel]:
    """A transformers model of class ``model_class`` built on the meta device from a config dict
    (for consolidation: its conversion mapping, tied weights and generation config); None
    when transformers has no such class."""
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, model_class, None)
    if cls is None or not hasattr(cls, "_from_config"):
        logger.warning("hf_zero: transformers has no class %r: writing in-memory names (no weight-name "
                       "conversion, no generation_config.json)", model_class)
        return None
    config = dict(config)
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        return cls._from_config(cfg)


def conversion_indices(model: torch.nn.Module) -> Optional[list[int]]:
    """Which of ``get_model_conversion_mapping(model)``'s transforms the model's load used (their
    indices, for a checkpoint manifest); None for a model built from a config (nothing loaded)."""
    used = getattr(model, "_hf_zero_conversions_used", None)   # hf_zero.from_pretrained
    if used is not None:
        return list(used)
    loaded = getattr(model, "_weight_conversions", None)       # transformers' from_pretrained
    if loaded is None:
        return None
    from transformers.conversion_mapping import get_model_conversion_mapping

    def signature(t: Any) -> tuple:
        return (type(t).__name__, tuple(t._original_source_patterns), tuple(t._original_target_patterns),
                t.scope_prefix)

    # _weight_conversions is set by transformers' from_pretrained: the model is a PreTrainedModel
    index = {signature(t): i for i, t in enumerate(get_model_conversion_mapping(cast("PreTrainedModel", model)))}
    found = [index.get(signature(t)) for t in loaded]
    if None in found:
        logger.warning("hf_zero: %s was loaded with weight conversions hf_zero cannot name; consolidation "
                       "will revert the model type's default ones", type(model).__name__)
        return None
    return cast("list[int]", found)   # no None past the check above
