"""ZeRO stages as strategy objects; :func:`build_stage` is the one place that picks one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from hf_zero.comm import Collectives
from hf_zero.flat_buffer import FlatParamGroup
from hf_zero.stages.base import ZeroStage

if TYPE_CHECKING:
    from hf_zero.diagnostics.step_report import StepTimers
    from hf_zero.quantized_comm import QuantizedCollectives


@dataclass(frozen=True)
class StageServices:
    """What a stage is given besides its groups: phase timers (``wall_clock_breakdown``) and
    ZeRO++ int8 collectives (``zero_quantized_gradients`` / ``zero_quantized_weights``, stages 1-2)."""

    timers: Optional["StepTimers"] = None
    quantized_gradients: Optional["QuantizedCollectives"] = None
    quantized_weights: Optional["QuantizedCollectives"] = None


def partition_world_for(stage: int, world_size: int) -> int:
    """How many ways each bucket is split: stage 0 replicates, stages 1-2 partition."""
    return 1 if stage == 0 else world_size


def build_groups_and_stage(stage: int, model, specs: list, comm: Collectives, *, bucket_numel: int,
                           overlap_comm: bool, allgather_bucket_numel: int, stage3_options: dict,
                           services: StageServices = StageServices()):
    """Lay out the trainable parameters for ``stage`` and build the stage.

    Returns (stage object, parameter groups, index of the optimizer group of each).
    ``stage3_options``: prefetch / persistence knobs, used by stage 3 only.
    """
    if stage == 3:
        from hf_zero.stages.stage3 import build_stage3

        # Stage 3 takes no quantized collectives (refused: engine_build.check_supported).
        return build_stage3(model, specs, comm, bucket_numel=bucket_numel, overlap_comm=overlap_comm,
                            allgather_bucket_numel=allgather_bucket_numel, timers=services.timers, **stage3_options)
    world = partition_world_for(stage, comm.world_size)
    indexed = [(i, s) for i, s in enumerate(specs) if s.params]
    groups = [FlatParamGroup(s.params, s.names, bucket_numel, world) for _, s in indexed]
    return (build_stage(stage, groups, comm, overlap_comm=overlap_comm, allgather_bucket_numel=allgather_bucket_numel,
                        services=services),
            groups, [i for i, _ in indexed])


def build_stage(stage: int, groups: list[FlatParamGroup], comm: Collectives, *, overlap_comm: bool,
                allgather_bucket_numel: int, services: StageServices = StageServices()) -> ZeroStage:
    if stage == 0:
        from hf_zero.stages.stage0 import AllReduceStage

        return AllReduceStage(groups, comm, overlap_comm=overlap_comm, timers=services.timers)
    if stage in (1, 2):
        from hf_zero.stages.stage1 import PartitionedOptimizerStage
        from hf_zero.stages.stage2 import PartitionedGradientStage

        kind = PartitionedOptimizerStage if stage == 1 else PartitionedGradientStage
        return kind(groups, comm, overlap_comm=overlap_comm, allgather_bucket_numel=allgather_bucket_numel,
                    quantized_gradients=services.quantized_gradients, quantized_weights=services.quantized_weights,
                    timers=services.timers)
    raise ValueError(f"zero_optimization.stage must be 0-3, got {stage}")


__all__ = ["StageServices", "ZeroStage", "build_groups_and_stage", "build_stage", "partition_world_for"]
