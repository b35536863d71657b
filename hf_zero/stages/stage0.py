"""Stage 0: plain data parallelism (bucketed all-reduce), the DDP equivalent."""

from __future__ import annotations

import torch

from hf_zero.flat_buffer import FlatParamGroup
from hf_zero.stages.base import Bucket
from hf_zero.stages.full_grads import FullGradStage


class AllReduceStage(FullGradStage):
    stage = 0
    partitions_optimizer = False

    def _launch(self, group: FlatParamGroup, bucket: Bucket):
        grads = group.bucket(self.grad_buffers[bucket.group_index], bucket.plan)
        work = self.comm.all_reduce_sum(grads, async_op=True)

        def average() -> None:
            # Averaging right away (not at the step) keeps a second reduction of the same
            # accumulated gradient (GA without no_sync) idempotent, as in DDP.
            if self.comm.world_size > 1:
                grads.div_(self.comm.world_size)

        return work, average

    @property
    def grad_divisor(self) -> float:
        return 1.0

    def owned_params(self) -> list[list[torch.Tensor]]:
        return [[g.bucket(g.data, p) for p in g.plans] for g in self.groups]

    def owned_grads(self) -> list[list[torch.Tensor]]:
        return [[g.bucket(buf, p) for p in g.plans] for g, buf in zip(self.groups, self.grad_buffers)]
