"""Stage 3: parameters partitioned too; gathered per unit around its forward and backward.

Units, the root and the persistent set are described in stage3_units.py's [Note: stage-3
units]; what is gathered ahead of use in prefetch.py's [Note: stage-3 prefetch]; how a
release frees memory that saved views still point at in sharded_params.py's [Note:
freeing gathered storage in place]; which pass is running in stage3_pass.py's [Note:
stage-3 pass state].

[Note: stage-3 release rule]
Forward: a block is gathered in its forward pre-hook and released in its forward hook
(unless the recorded order says its backward comes next), which also hooks the block's
outputs so that backward gathers it again just before it is needed. Backward: a block
may be released only when nothing left in this backward can read its weights. Weights are
read to compute gradients of the block's *inputs*, so the pre-hook puts a gradient hook
(a *marker*) on each input that needs a gradient; it fires once that input's gradient is
complete. The block is released when every marker of this pass has fired *and* every
trainable parameter of the block has its gradient. A block with no marker (its inputs need
no gradient: the first block of a LoRA model with frozen embeddings) stays gathered until
the end of backward, which releases everything; a block called several times per forward
waits for all its calls' markers. Activation checkpointing: transformers 5 checkpoints a
layer's ``forward``, so the block's own hooks stay outside the checkpoint and its markers
sit on the real inputs; a recompute that does run the block's hooks inside backward keeps
the weights gathered and (reentrant: the original forward built no graph) places the
markers itself. The root is re-gathered by a hook on the model's outputs if a nested no-grad pass released
it. The end-of-backward callback is queued from the model's outputs
(``watch_outputs`` in stages/base.py), so the nested backward of reentrant checkpointing
does not end the step early.
With parameter offload to NVMe (offload/param_store.py's [Note: parameter offload]) each
request also asks the store to start reading the shards of the units that follow in the
recorded order, beyond the gathers already started, within its read-ahead budget.
Gradients follow stage 2's path (staging bucket -> reduce-scatter into this rank's shard).
Traffic per step: all-gather in forward and in backward plus the reduce-scatter, 3x the
model bytes (less the root's second gather, plus persistent parameters' refresh).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

import torch
from torch import nn

from hf_zero.comm import Collectives
from hf_zero.diagnostics.step_report import StepTimers
from hf_zero.offload.param_store import ParamStore
from hf_zero.sharded_params import GatherState, ShardedParamGroup
from hf_zero.stages.base import output_tensors
from hf_zero.stages.prefetch import PrefetchPlanner
from hf_zero.stages.stage3_pass import INTERRUPTED, PassPhase, PassState
from hf_zero.stages.stage2 import PartitionedGradientStage
from hf_zero.stages.stage3_units import Unit, build_units


logger = logging.getLogger(__name__)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class PartitionedParameterStage(PartitionedGradientStage[ShardedParamGroup]):
    stage = 3

    def __init__(self, groups: list[ShardedParamGroup], units: list[Unit], root: Unit, persistent: Unit,
                 model: nn.Module, *args, prefetch_numel: int = 0, max_live_numel: int = 10**18,
                 store: Optional[ParamStore] = None, **kwargs):
        self.units, self.root, self.persistent, self.model = units, root, persistent, model
        self.store = store or ParamStore()
        self._read_ahead_started: set[int] = set()   # trace positions whose shards were asked for
        self._all_units = units + [root]
        super().__init__(groups, *args, **kwargs)
        self.frozen_groups = [g for u in self._all_units + [persistent] for g in u.frozen]
        self.planner = PrefetchPlanner(prefetch_numel, max_live_numel)
        self.peak_live_numel = 0     # most parameter elements gathered at once (persistent excluded)
        self._unit_of = {id(p): u for u in self._all_units + [persistent] for g in u.groups for p in g.params}
        owner = {id(p): u for u in self._all_units for g in u.all_groups for p in g.params}
        self._finish_queued_from_output = False
        self.pass_state = PassState()        # stage3_pass.py's [Note: stage-3 pass state]
        self._kept_by_nested: set[int] = set()   # units gathered when a nested no-grad pass began
        self._suspended_trace: Optional[tuple] = None   # the training pass's planner state during a nested pass
        persistent.gather()
        self._module_handles = [
            model.register_forward_pre_hook(self._root_pre_forward),
            model.register_forward_hook(self._root_post_forward, always_call=True),
        ]
        for unit in units:
            module = unit.module
            assert module is not None   # block units have one (only the root and persistent set do not)
            self._module_handles.append(module.register_forward_pre_hook(self._make_pre_forward(unit),
                                                                         with_kwargs=True))
            # always_call: a block that raises is released and its forward depth restored
            self._module_handles.append(module.register_forward_hook(self._make_post_forward(unit),
                                                                     always_call=True))
            for name, sub in module.named_modules():
                direct = list(sub.parameters(recurse=False))
                if sub is not module and direct and all(owner.get(id(p)) is unit for p in direct):
                    self._module_handles.append(sub.register_forward_pre_hook(self._make_borrow_check(unit, name)))
        self._warned_borrow: set[int] = set()

    # ---- gathering ------------------------------------------------------------------
    def _live_numel(self) -> int:
        return sum(u.numel for u in self._all_units if u.state is not GatherState.RELEASED)

    def _request(self, unit: Unit) -> None:
        """Gather ``unit`` for use now, and start gathering what the recorded order says is next."""
        self.planner.on_request(unit.index)
        unit.start_gather()
        ahead = self.planner.to_prefetch(lambda i: self._all_units[i].numel, self._live_numel(),
                                         lambda i: self._all_units[i].state is not GatherState.RELEASED)
        for index in ahead:
            self._all_units[index].start_gather()
        self.peak_live_numel = max(self.peak_live_numel, self._live_numel())
        if self.store.offloads:
            self._read_ahead()
        unit.wait()

    def _read_ahead(self) -> None:
        """Ask the store for the shards of the units next in the recorded order (not yet
        gathered), up to its read-ahead budget in shard elements."""
        budget = self.store.read_ahead_numel
        first = self.planner.position
        for position, index in enumerate(self.planner.upcoming(), start=first):
            unit = self._all_units[index]
            if unit.state is not GatherState.RELEASED:
                continue
            budget -= sum(g.shard.numel() for g in unit.all_groups)
            if budget < 0:
                break
            if position not in self._read_ahead_started:   # by trace position: forward and backward each read
                self._read_ahead_started.add(position)
                for group in unit.all_groups:
                    self.store.read_ahead(group.storage)

    def _release_all(self) -> None:
        for unit in self._all_units:
            unit.reset_backward()   # unpins first: nothing may stay gathered across an optimizer step
            unit.release()

    def _end_pass(self) -> None:
        """Release every unit, clear per-pass counters, back to IDLE (stage3_pass.py's note)."""
        if self.pass_state.phase is PassPhase.NESTED_NO_GRAD:
            assert self._suspended_trace is not None   # set on entering NESTED_NO_GRAD
            self.planner.resume(self._suspended_trace)
        self._release_all()
        self.planner.end_pass()
        self.pass_state.reset()

    # ---- forward / backward hooks ---------------------------------------------------
    def _root_pre_forward(self, module, args) -> None:
        state = self.pass_state
        if state.phase in INTERRUPTED:   # the previous forward raised before returning
            logger.debug("hf_zero stage 3: a forward did not return (%s); its pass is ended", state.phase.value)
            self._end_pass()
        if state.phase is PassPhase.BACKWARD and not _in_backward():   # a backward that raised
            self._end_pass()
        grad = torch.is_grad_enabled()
        if state.phase is PassPhase.AWAITING_BACKWARD and not grad:
            state.enter(PassPhase.NESTED_NO_GRAD)
            self._kept_by_nested = {u.index for u in self._all_units if u.state is not GatherState.RELEASED}
            self._suspended_trace = self.planner.suspend()
            self.planner.start_pass("no_grad")
        elif state.phase is PassPhase.AWAITING_BACKWARD:
            state.enter(PassPhase.FORWARD)   # a second forward of the same training pass
        else:
            state.enter(PassPhase.FORWARD if grad else PassPhase.NO_GRAD)
            self.planner.start_pass("train" if grad else "no_grad")
            self._read_ahead_started.clear()
        self._request(self.root)

    def _root_post_forward(self, module, args, output) -> None:
        state = self.pass_state
        if _raised(output):   # the forward raised (an always_call hook runs anyway)
            self._end_pass()
            return
        if state.phase is PassPhase.NESTED_NO_GRAD:
            for unit in self._all_units:   # release only what the nested pass gathered itself
                if unit.index not in self._kept_by_nested:
                    unit.release()
            assert self._suspended_trace is not None   # set on entering NESTED_NO_GRAD
            self.planner.resume(self._suspended_trace)
            state.enter(PassPhase.AWAITING_BACKWARD)
        elif state.phase is PassPhase.NO_GRAD:
            self._end_pass()
        else:
            state.enter(PassPhase.AWAITING_BACKWARD)
            for t in output_tensors(output):
                if t.requires_grad:
                    t.register_hook(self._root_pre_backward)

    def _root_pre_backward(self, grad):
        # The first gradient reaching the model's outputs starts the backward. The root was
        # gathered for the whole forward, but a nested no-grad pass may have released it.
        if self.pass_state.phase is PassPhase.AWAITING_BACKWARD:
            self.pass_state.enter(PassPhase.BACKWARD)
        if self.root.state is GatherState.RELEASED:
            self._request(self.root)
        return grad

    def _make_pre_forward(self, unit: Unit):
        def hook(module, args, kwargs):
            unit.in_forward += 1
            self._request(unit)
            if not torch.is_grad_enabled():
                return None
            if _in_backward() and unit.hooked_backward:
                return None    # non-reentrant recompute: the original forward's markers stand
            self._mark_inputs(unit, args, kwargs)
            return None
        return hook

    def _mark_inputs(self, unit: Unit, args: tuple, kwargs: dict) -> None:
        # A gradient hook on each input fires once that input's gradient is complete, i.e.
        # once every op of this call that reads the unit's weights has run its backward.
        # (Hooks, not an identity autograd function: the block may edit its inputs in place.)
        seen: set[int] = set()
        for value in (*args, *kwargs.values()):
            if _needs_grad(value) and id(value) not in seen:
                seen.add(id(value))
                unit.pending_inputs += 1
                value.register_hook(self._make_input_done(unit))

    def _make_input_done(self, unit: Unit):
        def hook(grad):
            self._on_inputs_done(unit)
            return grad
        return hook

    def _make_borrow_check(self, unit: Unit, name: str):
        # A submodule runs while its unit is released: another block calls it through a
        # reference that is not registered there. Gather its unit now (every rank takes the
        # same path, so the collective matches) and keep it until the pass ends, since
        # that block's backward will read the weights too.
        def hook(module, args):
            # In backward (an activation-checkpoint recompute runs the block's forward without
            # the block's own hooks) the weights were gathered for backward, or pinned in forward.
            if not unit.in_forward and not _in_backward():
                if unit.index not in self._warned_borrow:
                    self._warned_borrow.add(unit.index)
                    logger.warning("hf_zero stage 3: '%s' of %s runs outside its block's forward; it is gathered "
                                   "on demand and kept for the pass (register it where it is used)",
                                   name, type(unit.module).__name__)
                self._request(unit)
                unit.pinned = True
        return hook

    def _make_post_forward(self, unit: Unit):
        def hook(module, args, output):
            unit.in_forward -= 1
            if _raised(output):   # the block raised: its pass ends at the root's hook
                return
            if _in_backward():   # activation-checkpoint recompute: backward still needs the weights
                unit.hooked_backward = True
                return
            if not self.planner.next_request_is(unit.index):
                unit.release()
            if torch.is_grad_enabled():
                for t in output_tensors(output):
                    if t.requires_grad:
                        t.register_hook(self._make_pre_backward(unit))
        return hook

    def _make_pre_backward(self, unit: Unit):
        def hook(grad):
            if self.pass_state.phase is PassPhase.AWAITING_BACKWARD:   # outputs hooked outside the model
                self.pass_state.enter(PassPhase.BACKWARD)
            if not unit.hooked_backward or unit.state is GatherState.RELEASED:
                unit.hooked_backward = True
                self._request(unit)
            return grad
        return hook

    def _on_inputs_done(self, unit: Unit) -> None:
        unit.pending_inputs -= 1
        self._maybe_release(unit)

    def _maybe_release(self, unit: Unit) -> None:
        if unit.pending_inputs == 0 and unit.hooked_backward and unit.ready >= unit.num_trainable:
            unit.release()

    # ---- gradients ------------------------------------------------------------------
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        super()._on_grad_ready(param)
        unit = self._unit_of[id(param)]
        unit.ready += 1
        if unit.module is not None and unit.ready == unit.num_trainable:
            self._maybe_release(unit)

    def _finish_backward(self) -> None:
        super()._finish_backward()
        self._end_pass()

    # ---- what the optimizer sees ------------------------------------------------------
    def owned_params(self) -> list[list[torch.Tensor]]:
        return [g.shard_chunks() for g in self.groups]

    def after_step(self) -> None:
        """The shards changed: end any pass still open (a forward never backpropagated), so
        nothing gathered before the step survives it, and refresh the persistent parameters."""
        for group in self.groups:
            group.mark_shard_modified()
        if self.pass_state.phase is not PassPhase.IDLE:
            logger.debug("hf_zero stage 3: optimizer step during pass phase %s; the pass is ended",
                         self.pass_state.phase.value)
        self._end_pass()
        for group in self.persistent.groups:
            group.refresh()
        self.store.evict_all()   # shards the optimizer wrote (NVMe offload)

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        tensors = super().memory_tensors()
        tensors["persistent_params"] = [g.full for g in self.persistent.all_groups if g.gathered]
        return tensors

    def parameter_groups(self) -> list[ShardedParamGroup]:
        """Every sharded group, trainable and frozen (storage accounting, checkpoints)."""
        return list(self.groups) + list(self.frozen_groups)

    def subscribe_shard_edits(self, callback) -> None:
        for index, group in enumerate(self.groups):
            group.on_shard_modified.append(lambda _group, ranges, index=index: callback(index, ranges))

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for handle in self._module_handles:
            handle.remove()
        self._module_handles.clear()

    def unshard(self) -> None:
        """Give every parameter its own full tensor again (engine.destroy)."""
        for group in self.parameter_groups():
            group.gather()
            for p in group.params:
                p.data = p.data.clone()
                delattr(p, "_hf_zero_group")   # the tag sharded_params put on it
            group.full.untyped_storage().resize_(0)
            group.state = GatherState.RELEASED


def _raised(output: Any) -> bool:
    """In an ``always_call`` forward hook: whether the forward raised instead of returning
    (torch then calls the hook from its exception handler, with no output)."""
    return output is None and sys.exc_info()[1] is not None


def _needs_grad(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point()


def build_stage3(model: nn.Module, specs: list, comm, *, bucket_numel: int, overlap_comm: bool,
                 allgather_bucket_numel: int, prefetch_numel: int = 0, max_live_numel: int = 10**18,
                 persistence_threshold: int = 0, source=None, persist_frozen: bool = False,
                 store: Optional[ParamStore] = None, secondary_comm: Optional[Collectives] = None,
                 timers: Optional[StepTimers] = None):
    """Shard every parameter into its unit; returns (stage, trainable groups, spec index per group).

    ``source`` (meta_init.py): values of a meta-built model, identical on every rank by
    construction; otherwise every rank shards rank 0's weights. ``secondary_comm``: ZeRO++
    hpZ (topology.build_hpz_collectives); ``timers``: wall_clock_breakdown's phase timers."""
    if source is None:
        with torch.no_grad():
            for p in model.parameters():
                comm.broadcast(p.data)
    units, root, persistent, groups, group_spec = build_units(model, specs, comm, bucket_numel,
                                                              persistence_threshold, source, persist_frozen, store,
                                                              secondary_comm)
    if source is not None:
        source.close()
    stage = PartitionedParameterStage(groups, units, root, persistent, model, comm, overlap_comm=overlap_comm,
                                      allgather_bucket_numel=allgather_bucket_numel,
                                      prefetch_numel=prefetch_numel, max_live_numel=max_live_numel, store=store,
                                      timers=timers)
    return stage, groups, group_spec
