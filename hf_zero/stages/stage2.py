"""Stage 2: optimizer states and gradients partitioned.

Each gradient is copied into its bucket's transient staging buffer as soon as autograd
produces it (``param.grad`` is then dropped), and the bucket is reduce-scattered straight
into this rank's persistent gradient shard. No rank holds a full-size gradient after its
bucket fires; staging buffers live only while a bucket fills or its reduction is in flight.
"""

from __future__ import annotations

import torch

from hf_zero.flat_buffer import shard_chunks
from hf_zero.partition import shard_numel
from hf_zero.stages.base import Bucket, GroupT, ZeroStage
from hf_zero.stages.partitioned import PartitionedMixin


class PartitionedGradientStage(PartitionedMixin[GroupT], ZeroStage[GroupT]):
    stage = 2
    keeps_full_grads = False

    def __init__(self, groups: list[GroupT], *args, allgather_bucket_numel: int, quantized_gradients=None,
                 quantized_weights=None, **kwargs):
        self._set_partition_options(allgather_bucket_numel, quantized_gradients, quantized_weights)
        self._grad_shards: list[torch.Tensor] | None = None   # allocated by the first backward
        self._staging: dict[tuple[int, int], torch.Tensor] = {}   # (group, bucket start) -> 1D bucket
        self._shard_has_grad: set[tuple[int, int]] = set()
        super().__init__(groups, *args, **kwargs)
        self._plan_index = {(gi, p.start): bi for gi, g in enumerate(groups) for bi, p in enumerate(g.plans)}
        self._where = {}
        for bucket in self.buckets:
            for index in bucket.plan.param_indices:
                self._where[(bucket.group_index, index)] = bucket

    @property
    def grad_shards(self) -> list[torch.Tensor]:
        """Per group, 1D model dtype: this rank's chunk of every bucket, in bucket-plan order.
        Allocated on first use, so building an engine (or evaluating) holds no gradient memory."""
        if self._grad_shards is None:
            self._grad_shards = [torch.zeros(shard_numel(g.plans), dtype=g.dtype, device=g.device)
                                 for g in self.groups]
            self._grad_chunks = [shard_chunks(g.plans, shard) for g, shard in zip(self.groups, self._grad_shards)]
        return self._grad_shards

    @property
    def _shard_chunks(self) -> list[list[torch.Tensor]]:
        self.grad_shards
        return self._grad_chunks

    def _staging_for(self, bucket: Bucket) -> torch.Tensor:
        key = (bucket.group_index, bucket.plan.start)
        if key not in self._staging:
            group = self.groups[bucket.group_index]
            self._staging[key] = torch.zeros(bucket.plan.padded_numel, dtype=group.dtype,
                                             device=group.device)
        return self._staging[key]

    def _accept_grad(self, group: GroupT, index: int, param: torch.Tensor) -> None:
        group_index = self.groups.index(group)
        bucket = self._where[(group_index, index)]
        offset = bucket.plan.param_offsets[bucket.plan.param_indices.index(index)] - bucket.plan.start
        staging = self._staging_for(bucket)
        grad = param.grad   # just accumulated (the hook fires only then)
        assert grad is not None
        staging.narrow(0, offset, grad.numel()).add_(grad.reshape(-1))
        param.grad = None

    def _prepare_unused(self, bucket: Bucket) -> None:
        self._staging_for(bucket)

    def _launch(self, group: GroupT, bucket: Bucket):
        key = (bucket.group_index, bucket.plan.start)
        staging = self._staging.pop(key)
        shard_chunk = self._shard_chunks[bucket.group_index][self._plan_index[key]]
        if key not in self._shard_has_grad:
            self._shard_has_grad.add(key)
            work, finish = self._reduce_scatter(shard_chunk, staging)
            return work, lambda: (staging, finish())  # staging stays alive until the wait

        received = torch.empty_like(shard_chunk)
        work, finish = self._reduce_scatter(received, staging)
        return work, lambda: (staging, finish(), shard_chunk.add_(received))

    def owned_grads(self) -> list[list[torch.Tensor]]:
        return self._shard_chunks

    def zero_grad(self) -> None:
        for shard in self._grad_shards or []:
            shard.zero_()
        self._shard_has_grad.clear()
        for g in self.groups:
            for p in g.params:
                p.grad = None

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"grads": list(self._grad_shards or []), "comm_buffers": list(self._staging.values())}
