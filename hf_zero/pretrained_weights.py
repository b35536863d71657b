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
  asked for: the converter's source tensors (only those) are read whole, converted, and the
  result is kept until a parameter of another conversion is asked for. So the extra memory is
  one converted group (e.g. one layer's experts), never a file.
Missing, unexpected and mismatched keys follow transformers' rules (tied weights, the model's
``_keys_to_ignore_on_load_*``) and are reported by transformers' own ``log_state_dict_report``:
a warning naming every parameter left at its initialisation, and an error for a shape mismatch
unless ``ignore_mismatched_sizes`` (then the parameter stays at init, as in transformers).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hf_zero.checkpoint.safetensors_io import _DTYPES, SafetensorsFile

logger = logging.getLogger(__name__)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory (sharded index or single file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


class PretrainedWeights:
    """The loading plan of one checkpoint for one (meta-built) transformers model."""

    def __init__(self, path: Path, model: nn.Module, ignore_mismatched_sizes: bool = False):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.path, self.model = Path(path), model
        self.entries: dict[str, tuple[Path, torch.dtype, list[int]]] = {}   # key -> (file, dtype, shape)
        for file in checkpoint_files(self.path):
            handle = SafetensorsFile(file)
            for key, info in handle.header.items():
                self.entries[key] = (file, _DTYPES[info["dtype"]], list(info["shape"]))
            handle.close()
        mapping = get_model_conversion_mapping(model)
        self._mapping = mapping
        self._renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self._converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        self.expected = model.state_dict()   # meta tensors: names, shapes and dtypes only
        self.direct: dict[str, str] = {}                      # model name -> checkpoint key
        self.conversions: list[tuple[str, str, list[tuple[str, str, str]]]] = []
        self.converted: dict[str, int] = {}                   # model name -> index in conversions
        self._cache: tuple[int, dict[str, torch.Tensor]] = (-1, {})
        self._handles: dict[Path, SafetensorsFile] = {}
        self.report = self._plan(ignore_mismatched_sizes)

    # ---- the plan -------------------------------------------------------------------------
    def _plan(self, ignore_mismatched_sizes: bool):
        from transformers.core_model_loading import dot_natural_key, rename_source_key
        from transformers.utils.loading_report import LoadStateDictInfo, log_state_dict_report

        info = LoadStateDictInfo(missing_keys=set(self.expected), unexpected_keys=set(), mismatched_keys=set(),
                                 error_msgs=[], conversion_errors={}, skipped_pp_keys=set())
        prefix, groups = self.model.base_model_prefix, {}
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
        self.model._weight_conversions = [self._mapping[i] for i in used]
        self.model._hf_zero_conversions_used = used
        tied = getattr(self.model, "all_tied_weights_keys", {}) or {}
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
        for name, value in outputs.items():
            if name not in self.expected:
                info.unexpected_keys.add(name)
                continue
            info.missing_keys.discard(name)
            if list(value.shape) != list(self.expected[name].shape):
                info.mismatched_keys.add((name, tuple(value.shape), tuple(self.expected[name].shape)))
            else:
                self.converted[name] = index

    def _convert(self, index: int, meta: bool) -> dict[str, torch.Tensor]:
        """Run transformers' converter over the sources of conversion ``index`` (meta: shapes only)."""
        first, pattern, sources = self.conversions[index]
        converter = copy.deepcopy(self._by_pattern[pattern])   # one instance per target, as transformers does
        dtype = self.expected[first].dtype
        for renamed, key, source_pattern in sources:
            converter.add_tensor(renamed, key, source_pattern, lambda k=key: self._source(k, dtype, meta))
        outputs = converter.convert(first, model=self.model, config=getattr(self.model, "config", None))
        return {name: (value[0] if isinstance(value, list) else value) for name, value in outputs.items()}

    def _source(self, key: str, dtype: torch.dtype, meta: bool) -> torch.Tensor:
        file, stored, shape = self.entries[key]
        if meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        out = torch.empty(shape, dtype=stored)
        self._handle(file).read_into(key, 0, out.view(-1))
        return out.to(dtype)   # transformers casts each source to the parameter's dtype first

    # ---- reading --------------------------------------------------------------------------
    def key_for(self, name: str) -> Optional[str]:
        """The planned model name of a parameter name (peft's wrapper names stripped), or None."""
        bare = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        for candidate in (name, bare):
            if candidate in self.direct or candidate in self.converted:
                return candidate
        return None

    def read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + out.numel()) of planned parameter ``name`` into the 1D ``out``."""
        if name in self.direct:
            key = self.direct[name]
            self._handle(self.entries[key][0]).read_into(key, start, out)
            return
        index = self.converted[name]
        if self._cache[0] != index:
            self._cache = (-1, {})   # drop the previous group first: one converted group at a time
            self._cache = (index, self._convert(index, meta=False))
        out.copy_(self._cache[1][name].reshape(-1).narrow(0, start, out.numel()))

    def _handle(self, file: Path) -> SafetensorsFile:
        if file not in self._handles:
            self._handles[file] = SafetensorsFile(file)
        return self._handles[file]

    def close(self) -> None:
        self._cache = (-1, {})
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __deepcopy__(self, memo: dict) -> "PretrainedWeights":   # a model copy shares the plan, not a copy
        return self
