"""Which bytes of a Hugging Face checkpoint make each parameter: transformers' own loading, sliced.

[Note: pretrained loading through transformers' conversion machinery]
``transformers`` 5 renames and converts checkpoint keys at load time (``base_model_prefix``
added or stripped, legacy names, per-expert MoE tensors fused into ``mlp.experts.gate_up_proj``,
...). ``PretrainedWeights`` asks transformers itself, key by key, what each checkpoint tensor
becomes: ``get_model_conversion_mapping(model)`` gives the model's transforms and
``rename_source_key`` applies them exactly as ``convert_and_load_state_dict_in_model`` does
(keys in ``dot_natural_key`` order, so the per-expert lists stack in the same order). Only the
safetensors *headers* are read to build the plan, on every rank alike:
- a key that is only renamed maps one-to-one onto a parameter: each rank reads just the element
  range its shard needs, straight from the file;
- a key that feeds a ``WeightConverter`` (several source tensors -> one fused parameter, or one
  -> several) is converted by the converter itself. Shapes are checked up front by running the
  conversion on meta tensors; values are produced when the first slice of one of its targets is
  asked for, and kept until a slice of another conversion is asked for, so the extra memory is
  at most one converted group (e.g. one layer's experts), never a file. When the conversion
  stacks experts (its first operation is ``MergeModulelist(dim=0)`` and the rest concatenate
  along later dimensions, as for Mixtral's and Qwen2-MoE's experts), expert ``e`` of the
  target depends only on expert ``e``'s sources: a slice is made by converting only the
  experts it covers, so each rank reads just those source tensors.
- a conversion whose one operation joins or cuts along dim 0 (``Concatenate``, ``Chunk``,
  ``Split``, ``MergeModulelist`` of one source list) lays each target out as consecutive element
  ranges of its sources, in the converter's source order (e.g. HrmText's fused ``gqkv_proj``
  chunked into gate/q/k/v, Sarvam-MoE's ``query_key_value`` split by the targets' sizes,
  olmo_hybrid's q/k/v conv kernels concatenated): a slice reads just the ranges it covers, cast
  to the parameter's dtype as transformers does before the operation. No conversion runs.
- any other conversion (``Concatenate``/``Chunk`` along a later dim alone, ``Transpose``,
  ``Interleave``, ``PermuteForRope``, dequantisation and model-specific ops) reads the
  converter's source tensors (only those) whole.
Every read error names the file, the key and the parameter (``CheckpointReadError``); the
engine holds it and agrees on it across ranks (meta_init.py's ``ParameterSource``).
Missing, unexpected and mismatched keys follow transformers' rules (tied weights, the model's
``_keys_to_ignore_on_load_*``) and are reported by transformers' own ``log_state_dict_report``:
a warning naming every parameter left at its initialisation, and an error for a shape mismatch
unless ``ignore_mismatched_sizes`` (then the parameter stays at init, as in transformers).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional, cast

import torch
from torch import nn

from hf_zero.checkpoint.safetensors_io import _DTYPES, SafetensorsFile

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


class CheckpointReadError(OSError):
    """Reading a checkpoint tensor failed; the message names the file, the key and the parameter."""


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory (sharded index or single file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


_MODULES_TO_SAVE = re.compile(r"\.(?:original_module|modules_to_save\.[^.]+)\.")

# transformers' operations that join or cut along a dimension without changing values; `Split`
# is newer than transformers 5.18 (in 5.22; an older one has no model that uses it)
_DIM0_OPERATIONS = ("Chunk", "Split", "Concatenate", "MergeModulelist")


class PretrainedWeights:
    """The loading plan of one checkpoint for one (meta-built) transformers model."""

    def __init__(self, path: Path, model: nn.Module, ignore_mismatched_sizes: bool = False):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.path, self.model = Path(path), cast("PreTrainedModel", model)   # a transformers model (meta-built)
        self.entries: dict[str, tuple[Path, torch.dtype, list[int]]] = {}   # key -> (file, dtype, shape)
        for file in checkpoint_files(self.path):
            handle = SafetensorsFile(file)
            for key, info in handle.header.items():
                self.entries[key] = (file, _DTYPES[info["dtype"]], list(info["shape"]))
            handle.close()
        mapping = get_model_conversion_mapping(self.model)
        self._mapping = mapping
        self._renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self._converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        self.expected = model.state_dict()   # meta tensors: names, shapes and dtypes only
        self.direct: dict[str, str] = {}                      # model name -> checkpoint key
        self.conversions: list[tuple[str, str, list[tuple[str, str, str]]]] = []
        self.converted: dict[str, int] = {}                   # model name -> index in conversions
        self._experts: dict[int, int] = {}   # conversion index -> number of stacked experts (see note)
        # model name -> (first element in the run, [(checkpoint key, numel)]): dim-0 conversions
        self._runs: dict[str, tuple[int, list[tuple[str, int]]]] = {}
        self._cache: tuple[tuple, dict[str, torch.Tensor]] = ((), {})
        self.bytes_read = 0   # source bytes read for converted parameters (tests check the slicing)
        self._handles: dict[Path, SafetensorsFile] = {}
        self.report = self._plan(ignore_mismatched_sizes)

    # ---- the plan -------------------------------------------------------------------------
    def _plan(self, ignore_mismatched_sizes: bool):
        from transformers.core_model_loading import dot_natural_key, rename_source_key
        from transformers.utils.loading_report import LoadStateDictInfo, log_state_dict_report

        info = LoadStateDictInfo(missing_keys=set(self.expected), unexpected_keys=set(), mismatched_keys=set(),
                                 error_msgs=[], conversion_errors={}, skipped_pp_keys=set())
        prefix = self.model.base_model_prefix
        groups: dict[str, tuple[str, list[tuple[str, str, str]]]] = {}
        for key in sorted(self.entries, key=dot_natural_key):
            renamed, pattern = rename_source_key(key, self._renamings, self._converters, prefix, self.expected)
            if renamed not in self.expected and key in self.expected:
                renamed, pattern = rename_source_key(key, [], [], prefix, self.expected)
            if renamed in self.expected and pattern is not None:
                groups.setdefault(renamed, (pattern, []))[1].append((renamed, key, pattern))
            elif renamed in self.expected:
                self._check_direct(renamed, key, info)
            elif pattern is not None:   # every target of the converter is unexpected, as in transformers
                targets = self._by_pattern[pattern].target_patterns
                info.unexpected_keys.update(renamed.replace(targets[0], t) for t in targets)
            else:
                info.unexpected_keys.add(renamed)
        for first, (pattern, sources) in groups.items():
            self._check_conversion(first, pattern, sources, info)
        # As transformers does: saving reverts exactly the transforms this load used (the
        # indices let an offline consolidation rebuild the same list for a meta-built model).
        used = [i for i, transform in enumerate(self._mapping) if transform.was_used()]
        setattr(self.model, "_weight_conversions", [self._mapping[i] for i in used])
        setattr(self.model, "_hf_zero_conversions_used", used)
        tied = getattr(self.model, "all_tied_weights_keys", {}) or {}
        self._tied_to: dict[str, str] = dict(tied)   # a tied name (absent from the files) -> its source
        info.missing_keys -= {target for target, source in tied.items() if source not in info.missing_keys}
        if hasattr(self.model, "_adjust_missing_and_unexpected_keys"):
            self.model._adjust_missing_and_unexpected_keys(info)
        # transformers' own report: a warning naming missing, unexpected and mismatched keys
        # (and an error for a failed conversion)
        log_state_dict_report(self.model, str(self.path), True, info, logger)
        if info.mismatched_keys and not ignore_mismatched_sizes:
            shown = ", ".join(f"'{n}' (checkpoint {list(a)}, model {list(b)})"
                              for n, a, b in sorted(info.mismatched_keys)[:5])
            raise ValueError(f"{self.path}: shape mismatch for {shown}; pass ignore_mismatched_sizes=True to "
                             "keep those parameters at their initialisation")
        return info

    def _check_direct(self, name: str, key: str, info) -> None:
        shape, expected = self.entries[key][2], list(self.expected[name].shape)
        if shape != expected:
            info.mismatched_keys.add((name, tuple(shape), tuple(expected)))
        else:
            self.direct[name] = key
        info.missing_keys.discard(name)

    def _check_conversion(self, first: str, pattern: str, sources: list, info) -> None:
        index = len(self.conversions)
        self.conversions.append((first, pattern, sources))
        try:
            outputs = self._convert(index, meta=True)
        except Exception as err:   # transformers reports conversion failures the same way
            info.conversion_errors[first] = f"{type(err).__name__}: {err}"
            return
        if not self._note_runs(index, outputs):
            self._note_experts(index, outputs)
        for name, value in outputs.items():
            if name not in self.expected:
                info.unexpected_keys.add(name)
                continue
            info.missing_keys.discard(name)
            if list(value.shape) != list(self.expected[name].shape):
                info.mismatched_keys.add((name, tuple(value.shape), tuple(self.expected[name].shape)))
            else:
                self.converted[name] = index
        for name in set(outputs) - set(self.converted):
            self._runs.pop(name, None)

    def _note_runs(self, index: int, outputs: dict[str, torch.Tensor]) -> bool:
        """Record the element runs of a conversion that joins or cuts along dim 0 (module note)."""
        from transformers import core_model_loading

        joins_and_cuts = tuple(getattr(core_model_loading, name) for name in _DIM0_OPERATIONS
                               if hasattr(core_model_loading, name))
        MergeModulelist = core_model_loading.MergeModulelist   # noqa: N806 (transformers' class)
        converter = self._by_pattern[self.conversions[index][1]]
        operations = getattr(converter, "operations", [])
        if len(operations) != 1 or type(operations[0]) not in joins_and_cuts:
            return False
        by_pattern = self._sources_by_pattern(index)
        if operations[0].dim != 0 or (type(operations[0]) is MergeModulelist and len(by_pattern) != 1):
            return False
        # Concatenate joins the source patterns in the converter's order, each list in the order
        # it was added (_convert); Chunk / Split cut one source into the targets in their order.
        run = [(key, torch.Size(self.entries[key][2]).numel())
               for pattern in converter.source_patterns for _, key in by_pattern.get(pattern, [])]
        if sum(numel for _, numel in run) != sum(value.numel() for value in outputs.values()):
            return False
        offset = 0
        for name, value in outputs.items():   # the ops' output order is the targets' order
            self._runs[name] = (offset, run)
            offset += value.numel()
        return True

    def _note_experts(self, index: int, outputs: dict[str, torch.Tensor]) -> None:
        """Record conversion ``index`` as expert-stacking when its operations stack per-expert
        sources along dim 0 and concatenate only along later dims (see the module note)."""
        from transformers.core_model_loading import Concatenate, MergeModulelist

        operations = getattr(self._by_pattern[self.conversions[index][1]], "operations", [])
        if not operations or type(operations[0]) is not MergeModulelist or operations[0].dim != 0:
            return
        if any(type(op) is not Concatenate or op.dim < 1 for op in operations[1:]):
            return
        counts = {len(keys) for keys in self._sources_by_pattern(index).values()}
        if len(counts) == 1 and all(v.shape[0] == next(iter(counts)) for v in outputs.values()):
            self._experts[index] = counts.pop()

    def _sources_by_pattern(self, index: int) -> dict[str, list[tuple[str, str]]]:
        by_pattern: dict[str, list[tuple[str, str]]] = {}
        for renamed, key, source_pattern in self.conversions[index][2]:
            by_pattern.setdefault(source_pattern, []).append((renamed, key))
        return by_pattern

    def _convert(self, index: int, meta: bool, experts: Optional[tuple[int, int]] = None) -> dict[str, torch.Tensor]:
        """Run transformers' converter over the sources of conversion ``index`` (meta: shapes
        only); ``experts=(first, last)`` converts only those experts of a stacking conversion."""
        first, pattern, _ = self.conversions[index]
        converter = copy.deepcopy(self._by_pattern[pattern])   # one instance per target, as transformers does
        dtype = self.expected[first].dtype
        for source_pattern, entries in self._sources_by_pattern(index).items():
            if experts is not None:
                entries = entries[experts[0]:experts[1] + 1]
            for renamed, key in entries:
                # transformers annotates a Future; its own synchronous loading passes a callable, as here
                converter.add_tensor(renamed, key, source_pattern,
                                     lambda k=key: self._source(k, dtype, meta))  # type: ignore[arg-type]
        outputs = converter.convert(first, model=self.model, config=getattr(self.model, "config", None))
        return {name: (value[0] if isinstance(value, list) else value) for name, value in outputs.items()}

    def _source(self, key: str, dtype: torch.dtype, meta: bool) -> torch.Tensor:
        file, stored, shape = self.entries[key]
        if meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        out = torch.empty(shape, dtype=stored)
        self._read(key, 0, out.view(-1))
        return out.to(dtype)   # transformers casts each source to the parameter's dtype first

    def _read(self, key: str, start: int, out: torch.Tensor, counted: bool = True) -> None:
        """Elements [start, start + out.numel()) of checkpoint tensor ``key``; any failure
        becomes a CheckpointReadError naming the file and the key."""
        file = self.entries[key][0]
        try:
            self._handle(file).read_into(key, start, out)
        except Exception as err:
            where = "" if str(file) in str(err) else f" from {file}"   # most errors name the file already
            raise CheckpointReadError(f"reading '{key}'{where} failed: {type(err).__name__}: {err}") from err
        if counted:
            self.bytes_read += out.numel() * self.entries[key][1].itemsize

    # ---- reading --------------------------------------------------------------------------
    def key_for(self, name: str) -> Optional[str]:
        """The planned model name of a parameter name (peft's wrapper names stripped), or None."""
        bare = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        # peft's modules_to_save: both the frozen original and the trainable copy start from the
        # checkpoint's tensor (peft copies the original when it wraps a loaded model)
        bare = _MODULES_TO_SAVE.sub(".", bare)
        # a copy of a tied parameter (peft's modules_to_save of GPT-2's lm_head) reads its source
        for candidate in (name, bare, self._tied_to.get(bare, "")):
            if candidate in self.direct or candidate in self.converted:
                return candidate
        return None

    def read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + out.numel()) of planned parameter ``name`` into the 1D ``out``."""
        if name in self.direct:
            self._read(self.direct[name], start, out, counted=False)
            return
        if name in self._runs:
            self._read_runs(name, start, out)
            return
        index, offset, experts = self.converted[name], 0, None
        if index in self._experts:   # convert just the experts this slice covers
            per_expert = self.expected[name].numel() // self._experts[index]
            experts = (start // per_expert, (start + max(out.numel(), 1) - 1) // per_expert)
            offset = experts[0] * per_expert
        if self._cache[0] != (index, experts):
            self._cache = ((), {})   # drop the previous group first: one converted group at a time
            self._cache = ((index, experts), self._convert(index, meta=False, experts=experts))
        out.copy_(self._cache[1][name].reshape(-1).narrow(0, start - offset, out.numel()))

    def _read_runs(self, name: str, start: int, out: torch.Tensor) -> None:
        """A slice of a dim-0 conversion's target: just the source ranges it covers."""
        first, run = self._runs[name]
        begin, end, source_begin = first + start, first + start + out.numel(), 0
        for key, numel in run:
            lo, hi = max(begin, source_begin), min(end, source_begin + numel)
            if lo < hi:
                self._read(key, lo - source_begin, out.narrow(0, lo - begin, hi - lo))
            source_begin += numel

    def _handle(self, file: Path) -> SafetensorsFile:
        if file not in self._handles:
            self._handles[file] = SafetensorsFile(file)
        return self._handles[file]

    def close(self) -> None:
        self._cache = ((), {})
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __deepcopy__(self, memo: dict) -> "PretrainedWeights":   # a model copy shares the plan, not a copy
        return self
