"""ZeRO stages as strategy objects; :func:`build_stage` is the one place that picks one."""

from __future__ import annotations

from hf_zero.comm import Collectives
from hf_zero.flat_buffer import FlatParamGroup
from hf_zero.stages.base import ZeroStage


def partition_world_for(stage: int, world_size: int) -> int:
    """How many ways each bucket is split: stage 0 replicates, stages 1-2 partition."""
    return 1 if stage == 0 else world_size


def build_stage(stage: int, groups: list[FlatParamGroup], comm: Collectives, *, overlap_comm: bool,
                allgather_bucket_numel: int) -> ZeroStage:
    if stage == 0:
        from hf_zero.stages.stage0 import AllReduceStage

        return AllReduceStage(groups, comm, overlap_comm=overlap_comm)
    if stage == 1:
        from hf_zero.stages.stage1 import PartitionedOptimizerStage

        return PartitionedOptimizerStage(groups, comm, overlap_comm=overlap_comm,
                                         allgather_bucket_numel=allgather_bucket_numel)
    if stage == 2:
        from hf_zero.stages.stage2 import PartitionedGradientStage

        return PartitionedGradientStage(groups, comm, overlap_comm=overlap_comm,
                                        allgather_bucket_numel=allgather_bucket_numel)
    raise NotImplementedError(f"zero_optimization.stage={stage} is not available yet "
                              "(stage 3 is tracked in its own issue); use 0, 1 or 2")


__all__ = ["ZeroStage", "build_stage", "partition_world_for"]
