"""What stages 1 and 2 share: owned chunks and the post-step all-gather of partitions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, Optional

import torch

from hf_zero.diagnostics.step_report import timed
from hf_zero.flat_buffer import FlatParamGroup
from hf_zero.stages.base import GroupT, ZeroStage

if TYPE_CHECKING:
    from hf_zero.quantized_comm import QuantizedCollectives

    _StageBase = ZeroStage   # for the checker: the mixin's methods use ZeroStage's attributes
else:
    _StageBase = Generic     # at run time a plain mixin, listed before a ZeroStage subclass


def _nothing() -> None:
    pass


class PartitionedMixin(_StageBase[GroupT]):
    """Each rank owns chunk ``rank`` of every bucket (partition.py's ownership note)."""

    partitions_optimizer = True
    allgather_bucket_numel: int
    quantized_gradients: Optional[QuantizedCollectives] = None   # when zero_quantized_gradients is on
    quantized_weights: Optional[QuantizedCollectives] = None     # when zero_quantized_weights is on

    def _set_partition_options(self, allgather_bucket_numel: int, quantized_gradients: Optional[QuantizedCollectives],
                               quantized_weights: Optional[QuantizedCollectives]) -> None:
        self.allgather_bucket_numel = allgather_bucket_numel
        self.quantized_gradients, self.quantized_weights = quantized_gradients, quantized_weights

    def _reduce_scatter(self, output: torch.Tensor, input: torch.Tensor):
        """Start a bucket's reduce-scatter; returns (work, finish) with finish() run after the wait."""
        if self.quantized_gradients is not None:
            return self.quantized_gradients.reduce_scatter_sum(output, input)
        return self.comm.reduce_scatter_sum(output, input, async_op=True), _nothing

    # Methods that read FlatParamGroup's ``data`` (stage 3 overrides owned_params and after_step).
    def owned_params(self: PartitionedMixin[FlatParamGroup]) -> list[list[torch.Tensor]]:
        return [[g.chunk(g.data, p, self.partition_rank) for p in g.plans] for g in self.groups]

    @property
    def grad_divisor(self) -> float:
        return float(self.comm.data_parallel_size)   # with replicas (mics_shard_size): all ranks

    def after_step(self: PartitionedMixin[FlatParamGroup]) -> None:
        with timed(self.timers, "allgather"):
            self._gather_partitions()

    def _gather_partitions(self: PartitionedMixin[FlatParamGroup]) -> None:
        # In-place all-gather: this rank's updated chunk is already in place in ``data``.
        # At most ``allgather_bucket_numel`` elements are in flight at once.
        if self.quantized_weights is not None:
            for bucket in self.buckets:
                group = self.groups[bucket.group_index]
                mine = group.chunk(group.data, bucket.plan, self.partition_rank)
                self.quantized_weights.all_gather(group.bucket(group.data, bucket.plan), mine)
            return
        in_flight: list = []
        in_flight_numel = 0
        for bucket in self.buckets:
            group = self.groups[bucket.group_index]
            full = group.bucket(group.data, bucket.plan)
            mine = group.chunk(group.data, bucket.plan, self.partition_rank)
            if in_flight and in_flight_numel + full.numel() > self.allgather_bucket_numel:
                for work in in_flight:
                    work.wait()
                in_flight, in_flight_numel = [], 0
            in_flight.append(self.comm.all_gather(full, mine, async_op=True))
            in_flight_numel += full.numel()
        for work in in_flight:
            work.wait()
