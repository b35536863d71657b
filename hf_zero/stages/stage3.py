"""Stage 3: parameters partitioned too; gathered per unit around its forward and backward.

[Note: stage-3 units]
A *unit* is a module whose parameters are gathered and released together: every instance
of the model's ``_no_split_modules`` classes (transformer blocks, as FSDP wraps them), plus
a root unit with all remaining trainable parameters (embeddings, final norm, a tied head).
- Block units: gathered in a forward pre-hook, released in the forward hook; the forward
  hook also puts a gradient hook on the block's output, which gathers the block again when
  backward reaches it. When every trainable parameter of the block has its gradient (post-
  accumulate-grad hooks), the block is released. Gradients follow stage 2's path
  (staging bucket -> reduce-scatter into this rank's gradient shard).
- The root unit is gathered at the model's forward pre-hook and stays gathered until the
  end of backward (or the end of forward when no graph is built), since embeddings are used
  first and the head last.
Gathers happen in execution order, which is the same on every rank, so collectives match.
Frozen parameters are not sharded. The optimizer updates the shard chunks in place; after
the step nothing is all-gathered: the next forward gathers. Traffic: all-gather in forward
and in backward plus the reduce-scatter: 3x the model bytes per step.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hf_zero.sharded_params import ShardedParamGroup
from hf_zero.stages.stage2 import PartitionedGradientStage


class Unit:
    def __init__(self, module: Optional[nn.Module], groups: list[ShardedParamGroup]):
        self.module = module            # None for the root unit
        self.groups = groups
        self.num_trainable = sum(len(g.params) for g in groups)
        self.ready = 0                  # parameters whose gradient arrived in this backward
        self.hooked_backward = False

    def gather(self, comm) -> None:
        for g in self.groups:
            g.gather(comm)

    def release(self) -> None:
        for g in self.groups:
            g.release()


def find_unit_modules(model: nn.Module) -> list[nn.Module]:
    """Outermost instances of the model's ``_no_split_modules`` classes."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        base = getattr(model, "get_base_model", None)   # peft models keep the list on the base model
        names = set(getattr(base(), "_no_split_modules", None) or ()) if callable(base) else set()
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in names:
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class PartitionedParameterStage(PartitionedGradientStage):
    stage = 3

    def __init__(self, groups: list[ShardedParamGroup], units: list[Unit], root: Unit, model: nn.Module,
                 *args, **kwargs):
        self.units, self.root, self.model = units, root, model
        super().__init__(groups, *args, **kwargs)
        self._unit_of = {id(p): u for u in units + [root] for g in u.groups for p in g.params}
        self._module_handles = []
        for unit in units:
            self._module_handles.append(unit.module.register_forward_pre_hook(self._make_pre_forward(unit)))
            self._module_handles.append(unit.module.register_forward_hook(self._make_post_forward(unit)))
        self._module_handles.append(model.register_forward_pre_hook(lambda m, a: self.root.gather(self.comm)))
        self._module_handles.append(model.register_forward_hook(self._root_post_forward))

    # ---- forward / backward hooks ---------------------------------------------------
    def _make_pre_forward(self, unit: Unit):
        def hook(module, args):
            unit.gather(self.comm)
        return hook

    def _make_post_forward(self, unit: Unit):
        def hook(module, args, output):
            if _in_backward():   # activation-checkpoint recompute: backward still needs the weights
                return
            unit.release()
            if torch.is_grad_enabled():
                unit.hooked_backward = False
                for t in _tensors(output):
                    if t.requires_grad:
                        t.register_hook(self._make_pre_backward(unit))
        return hook

    def _make_pre_backward(self, unit: Unit):
        def hook(grad):
            if not unit.hooked_backward:
                unit.hooked_backward = True
                unit.gather(self.comm)
            return grad
        return hook

    def _root_post_forward(self, module, args, output):
        if not torch.is_grad_enabled():
            self.root.release()
            for unit in self.units:
                unit.release()

    # ---- gradients ------------------------------------------------------------------
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        super()._on_grad_ready(param)
        unit = self._unit_of[id(param)]
        unit.ready += 1
        if unit.module is not None and unit.ready == unit.num_trainable:
            unit.release()

    def _finish_backward(self) -> None:
        super()._finish_backward()
        for unit in self.units + [self.root]:
            unit.ready = 0
            unit.release()

    # ---- what the optimizer sees ------------------------------------------------------
    def owned_params(self) -> list[list[torch.Tensor]]:
        return [g.shard_chunks() for g in self.groups]

    def after_step(self) -> None:
        """Nothing to gather: the next forward gathers the updated shards."""

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for handle in self._module_handles:
            handle.remove()
        self._module_handles.clear()

    def unshard(self) -> None:
        """Give every parameter its own full tensor again (engine.destroy)."""
        for group in self.groups:
            group.gather(self.comm)
            for p in group.params:
                p.data = p.data.clone()
            group.full = None


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def build_stage3(model: nn.Module, specs: list, comm, *, bucket_numel: int, overlap_comm: bool,
                 allgather_bucket_numel: int):
    """Shard the trainable parameters into units; returns (stage, groups, spec index per group)."""
    with torch.no_grad():   # every rank shards rank 0's weights
        for p in model.parameters():
            comm.broadcast(p.data)
    unit_modules = find_unit_modules(model)
    member = {id(p): i for i, m in enumerate(unit_modules) for p in m.parameters()}
    groups, group_spec, units = [], [], []
    per_unit: dict[Optional[int], list[ShardedParamGroup]] = {}
    # Backward visits the last block first and the root (embeddings) last: build groups in
    # that order so bucket launches follow gradient readiness.
    for unit_index in [*reversed(range(len(unit_modules))), None]:
        for spec_index, spec in enumerate(specs):
            chosen = [(p, n) for p, n in zip(spec.params, spec.names) if member.get(id(p)) == unit_index]
            if not chosen:
                continue
            group = ShardedParamGroup([p for p, _ in chosen], [n for _, n in chosen], bucket_numel, comm)
            groups.append(group)
            group_spec.append(spec_index)
            per_unit.setdefault(unit_index, []).append(group)
    units = [Unit(unit_modules[i], per_unit[i]) for i in range(len(unit_modules)) if i in per_unit]
    units += [Unit(unit_modules[i], []) for i in range(len(unit_modules)) if i not in per_unit]
    root = Unit(None, per_unit.get(None, []))
    stage = PartitionedParameterStage(groups, units, root, model, comm, overlap_comm=overlap_comm,
                                      allgather_bucket_numel=allgather_bucket_numel)
    return stage, groups, group_spec
