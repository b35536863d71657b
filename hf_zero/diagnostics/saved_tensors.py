"""What autograd's saved tensors keep allocated: measured storage bytes, not bookkeeping.

Modules save tensors for backward, and a saved *view* of a weight (``nn.Linear`` saves
``weight.t()``) keeps the weight's storage alive whatever happens to the parameter. To
measure what a forward pass leaves allocated, walk the graph from its outputs, read every
node's saved tensors (custom Functions' too), and sum
``untyped_storage().nbytes()`` once per distinct storage. Saved tensors are read packed
(``_raw_saved_*``), never unpacked: unpacking a non-reentrant activation checkpoint would
run the recompute. ``ParameterStorageRecorder``
remembers which storages were parameter storages while the forward ran (a forward
pre-hook on every module with parameters), so the sum can be restricted to them.
Used by the stage-3 memory test and ``benchmarks/stage3_memory.py``.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata   # identity of the storage object (shared by views)


def _tensors_in(value) -> Iterator[torch.Tensor]:
    """Tensors in a packed saved value: a SavedTensor's packed data (a tensor, or whatever a
    saved-tensors hook packed: an activation checkpoint's holder holds none), lists, tuples."""
    if isinstance(value, torch._C._autograd.SavedTensor):
        try:
            value = value.data   # type: ignore[attr-defined]  # SavedTensor.data is not in torch's stubs
        except RuntimeError:   # already freed by a backward
            return
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)


def saved_tensors(roots: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Every tensor saved for backward by the graph reachable from ``roots``."""
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in dir(node):
            if name.startswith("_raw_saved_"):
                try:
                    yield from _tensors_in(getattr(node, name))
                except RuntimeError:   # already freed by a backward
                    continue
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


def saved_storage_bytes(roots: Iterable[torch.Tensor], among: Optional[set[int]] = None) -> int:
    """Bytes of the distinct storages the graph's saved tensors keep (only storages in
    ``among``, keys from ``ParameterStorageRecorder``, when given)."""
    sizes: dict[int, int] = {}
    for t in saved_tensors(roots):
        key = _storage_key(t)
        if among is None or key in among:
            sizes[key] = t.untyped_storage().nbytes()
    return sum(sizes.values())


class ParameterStorageRecorder:
    """Records the storage of every non-empty parameter as each module's forward starts.

    ``keep=True`` also keeps the storage objects, so ``allocated_bytes()`` can sum what they
    hold now, also while no parameter points at them (a gather in flight). Only for engines
    that keep one storage per gathered buffer and free it in place (hf_zero stage 3, FSDP2):
    elsewhere keeping the objects would keep released memory alive."""

    def __init__(self, model: nn.Module, keep: bool = False):
        self.keys: set[int] = set()
        self._kept: Optional[dict[int, torch.UntypedStorage]] = {} if keep else None
        self._handles = [m.register_forward_pre_hook(self._record) for m in model.modules()
                         if any(True for _ in m.parameters(recurse=False))]

    def _record(self, module: nn.Module, args) -> None:
        for p in module.parameters(recurse=False):
            if p.numel() > 0:
                self.keys.add(_storage_key(p))
                if self._kept is not None:
                    self._kept.setdefault(_storage_key(p), p.untyped_storage())

    def allocated_bytes(self) -> int:
        """Bytes the kept parameter storages hold now (``keep=True``)."""
        assert self._kept is not None, "allocated_bytes needs ParameterStorages(model, keep=True)"
        return sum(int(storage.nbytes()) for storage in self._kept.values())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
