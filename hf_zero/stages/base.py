"""What every ZeRO stage shares: gradient-ready hooks, ordered bucket launches, waiting.

[Note: reduction schedule]
Each trainable parameter gets a post-accumulate-grad hook. When every parameter of a
bucket has its gradient for this backward, the bucket is *ready*; buckets are launched
strictly in a fixed order (the same on every rank, so gloo/NCCL match the collectives),
a ready bucket waiting for earlier ones. At the end of the backward pass (an autograd
engine callback queued by the first hook) the remaining buckets, including those whose
parameters got no gradient this step, are launched in order and every pending
reduction is waited for. Inside ``no_sync()`` stages that keep full gradients (0 and 1)
only accumulate; stage 2 keeps no full gradient, so it reduces every micro-step.

Reductions always SUM; ``grad_divisor`` tells the optimizer what to divide by, folded
into the single unscale/clip multiply.
"""

from __future__ import annotations

import abc
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Optional, Protocol, Sequence, TypeVar

import torch
from torch import nn

from hf_zero.comm import Collectives
from hf_zero.diagnostics.step_report import StepTimers, timed
from hf_zero.partition import BucketPlan

MAX_INFLIGHT_BUCKETS = 2  # bounds transient reduction buffers; two keep the wire busy


class ParamGroup(Protocol):
    """What the shared stage code reads of a parameter group: flat_buffer.FlatParamGroup
    (stages 0-2) and sharded_params.ShardedParamGroup (stage 3) both provide it."""
    params: list[nn.Parameter]
    names: list[str]
    plans: list[BucketPlan]

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...


GroupT = TypeVar("GroupT", bound=ParamGroup)


@dataclass(eq=False)
class Bucket:
    group_index: int
    plan: BucketPlan
    ready: int = 0          # parameters whose gradient arrived in this backward
    launched: bool = False

    @property
    def num_params(self) -> int:
        return len(self.plan.param_indices)


@dataclass
class _Pending:
    work: Any                       # torch Work (or a done stand-in): has .wait()
    on_done: Callable[[], None]     # runs after the wait (copy out, free buffers)


class ZeroStage(abc.ABC, Generic[GroupT]):
    """Gradient reduction and parameter refresh for one ZeRO stage (strategy object)."""

    stage: int
    partitions_optimizer: bool      # each rank updates only its chunk of every bucket
    keeps_full_grads: bool          # a full-size gradient buffer exists between steps

    # Groups of frozen parameters that the stage shards too (stage 3); none below stage 3.
    frozen_groups: Sequence[GroupT] = ()

    def __init__(self, groups: list[GroupT], comm: Collectives, overlap_comm: bool = True,
                 timers: Optional[StepTimers] = None):
        self.groups = groups
        self.comm = comm
        self.overlap_comm = overlap_comm
        self.timers = timers   # phase timers when wall_clock_breakdown is on
        self.partition_world = groups[0].plans[0].world
        self.partition_rank = comm.rank if self.partition_world > 1 else 0
        self.buckets = self._ordered_buckets()
        self._bucket_of: dict[int, tuple[Bucket, int]] = {}
        for bucket in self.buckets:
            group = groups[bucket.group_index]
            for index in bucket.plan.param_indices:
                self._bucket_of[id(group.params[index])] = (bucket, index)
        self._seen: set[int] = set()
        self._next_launch = 0
        self._pending: deque[_Pending] = deque()
        self._callback_queued = False
        self._sync = True
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                         for g in groups for p in g.params]

    # ---- ordering -------------------------------------------------------------------
    def _ordered_buckets(self) -> list[Bucket]:
        # Layout order within a group is backward-ready order; across groups a bucket is
        # ranked by its earliest parameter position in the model's (reversed) order, which
        # every rank computes identically.
        position: dict[int, int] = {}
        for g in self.groups:
            for p in g.params:
                position.setdefault(id(p), len(position))
        rank_key = {}
        for gi, g in enumerate(self.groups):
            for plan in g.plans:
                rank_key[(gi, plan.start)] = min(position[id(g.params[i])] for i in plan.param_indices)
        items = [(rank_key[(gi, p.start)], gi, p.start, p) for gi, g in enumerate(self.groups) for p in g.plans]
        return [Bucket(gi, plan) for _, gi, _, plan in sorted(items, key=lambda t: t[:3])]

    # ---- hooks ----------------------------------------------------------------------
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        bucket, index = self._bucket_of[id(param)]
        group = self.groups[bucket.group_index]
        if bucket.launched:
            raise RuntimeError(
                f"hf_zero: parameter '{group.names[index]}' received a second gradient after its "
                "bucket was reduced in this backward (a second backward through the same graph, "
                "or a backward that does not start from the model's outputs)")
        self._accept_grad(group, index, param)
        if id(param) in self._seen:
            return
        self._seen.add(id(param))
        bucket.ready += 1
        if self._reduces_now():
            self._launch_ready()

    def _reduces_now(self) -> bool:
        return self._sync or not self.keeps_full_grads

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.ready < bucket.num_params:
                return
            self._launch_bucket(bucket)

    def _launch_bucket(self, bucket: Bucket) -> None:
        bucket.launched = True
        self._next_launch += 1
        work, on_done = self._launch(self.groups[bucket.group_index], bucket)
        self._pending.append(_Pending(work, on_done))
        if not self.overlap_comm or len(self._pending) > MAX_INFLIGHT_BUCKETS:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        pending = self._pending.popleft()
        pending.work.wait()
        pending.on_done()

    grads_version = 0   # bumped whenever a backward has changed the gradients (norm caching)

    def _finish_backward(self) -> None:
        self.grads_version += 1
        if self._reduces_now():
            for bucket in self.buckets[self._next_launch:]:
                self._prepare_unused(bucket)
                self._launch_bucket(bucket)
        self.wait_for_reductions()
        for bucket in self.buckets:
            bucket.ready, bucket.launched = 0, False
        self._seen.clear()
        self._next_launch = 0
        self._callback_queued = False

    def wait_for_reductions(self) -> None:
        if not self._pending:
            return
        with timed(self.timers, "reduction_wait"):
            while self._pending:
                self._complete_oldest()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip reductions for backward passes inside (stages keeping full gradients only)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def watch_outputs(self, model: torch.nn.Module) -> None:
        """Queue the end-of-backward callback from the model's outputs, i.e. in the outermost
        backward: reentrant activation checkpointing runs a nested backward per segment,
        and a callback queued from a parameter hook inside it would end the step early."""
        self._handles.append(model.register_forward_hook(self._hook_outputs))

    def _hook_outputs(self, module, args, output) -> None:
        if torch.is_grad_enabled():
            for t in output_tensors(output):
                if t.requires_grad:
                    t.register_hook(self._queue_finish_from_output)

    def _queue_finish_from_output(self, grad: torch.Tensor) -> torch.Tensor:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        return grad

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- what each stage supplies ----------------------------------------------------
    @abc.abstractmethod
    def _accept_grad(self, group: GroupT, index: int, param: torch.Tensor) -> None:
        """Move ``param.grad`` (just accumulated) into the stage's gradient storage."""

    @abc.abstractmethod
    def _launch(self, group: GroupT, bucket: Bucket) -> tuple[object, Callable[[], None]]:
        """Start the bucket's reduction; return (work, completion callback)."""

    def _prepare_unused(self, bucket: Bucket) -> None:
        """Called before force-launching a bucket some of whose parameters got no gradient."""

    @property
    @abc.abstractmethod
    def grad_divisor(self) -> float:
        """Owned gradients hold sum-over-ranks x this; the optimizer divides by it."""

    @abc.abstractmethod
    def owned_params(self) -> list[list[torch.Tensor]]:
        """Per group, per bucket: the 1D parameter chunk this rank updates (model dtype)."""

    @abc.abstractmethod
    def owned_grads(self) -> list[list[torch.Tensor]]:
        """Per group, per bucket: the reduced 1D gradient chunk matching ``owned_params``."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Clear accumulated gradients (storage is kept)."""

    def after_step(self) -> None:
        """Make every rank's full parameters current after the optimizer updated its chunks."""

    def parameter_groups(self) -> list[GroupT]:
        """Every group that owns parameter storage: trainable, plus frozen ones (stage 3)
        (storage accounting, the initial broadcast, checkpoints)."""
        return list(self.groups) + list(self.frozen_groups)

    def unshard(self) -> None:
        """Give every parameter its own whole tensor again (``engine.destroy``); stages 0-2
        never took it away."""

    def subscribe_shard_edits(self, callback: Callable[[int, list[tuple[int, int, int]]], None]) -> None:
        """Call ``callback(group_index, ranges)`` whenever parameter values of trainable group
        ``groups[group_index]`` are edited outside the optimizer (``GatheredParameters`` with
        ``modifier_rank``); ``ranges``: (chunk, start, length) in that group's ``owned_params``
        chunks. Stages 0-2 never report an edit (their ``GatheredParameters`` does nothing)."""

    @abc.abstractmethod
    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Tensors this stage owns, by accounting category ('grads', 'comm_buffers')."""


def output_tensors(value) -> list[torch.Tensor]:
    """Every tensor in a (nested) forward output: tensors, dicts (ModelOutput), lists, tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in output_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in output_tensors(v)]
    return []
