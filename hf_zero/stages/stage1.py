"""Stage 1: optimizer states partitioned; gradients kept full, reduce-scattered per bucket."""

from __future__ import annotations

import torch

from hf_zero.flat_buffer import FlatParamGroup
from hf_zero.stages.base import Bucket
from hf_zero.stages.full_grads import FullGradStage
from hf_zero.stages.partitioned import PartitionedMixin


class PartitionedOptimizerStage(PartitionedMixin[FlatParamGroup], FullGradStage):
    stage = 1

    def __init__(self, *args, allgather_bucket_numel: int, quantized_gradients=None, quantized_weights=None,
                 **kwargs):
        self._set_partition_options(allgather_bucket_numel, quantized_gradients, quantized_weights)
        super().__init__(*args, **kwargs)

    def _launch(self, group: FlatParamGroup, bucket: Bucket):
        grads = self.grad_buffers[bucket.group_index]
        full = group.bucket(grads, bucket.plan)
        received = torch.empty(bucket.plan.chunk_numel, dtype=full.dtype, device=full.device)
        work, finish = self._reduce_scatter(received, full)

        def keep_own_chunk() -> None:
            finish()
            # The owner keeps the sum; other chunks are zeroed so a later reduction of the
            # same buffer (GA without no_sync) adds each rank's new gradient exactly once.
            full.zero_()
            group.chunk(grads, bucket.plan, self.partition_rank).copy_(received)

        return work, keep_own_chunk

    def owned_grads(self) -> list[list[torch.Tensor]]:
        return [[g.chunk(buf, p, self.partition_rank) for p in g.plans]
                for g, buf in zip(self.groups, self.grad_buffers)]

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"grads": list(self.grad_buffers)}
