"""Stage-3 parameter storage: at rest a rank holds only its chunk of every bucket.

Same layout as ``FlatParamGroup`` (partition.py's [Note: bucket-interleaved ownership]),
but the full flat buffer exists only between ``gather()`` and ``release()``; at rest each
``param.data`` is an empty tensor and ``param.ds_shape`` / ``param.ds_numel`` give the true
shape (the attribute names peft and other DeepSpeed-aware code read).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hf_zero.comm import Collectives
from hf_zero.flat_buffer import shard_chunks, views_by_param
from hf_zero.partition import BucketPlan, plan_buckets, shard_numel, total_numel


class ShardedParamGroup:
    params: list[nn.Parameter]
    names: list[str]
    plans: list[BucketPlan]
    shard: torch.Tensor             # 1D, model dtype: this rank's chunk of every bucket, in plan order
    full: Optional[torch.Tensor]    # 1D, model dtype, padded; only while gathered

    def __init__(self, params: list[nn.Parameter], names: list[str], bucket_numel: int, comm: Collectives):
        world, rank = comm.world_size, comm.rank
        self.params, self.names, self.rank, self.comm = params, names, rank, comm
        self.on_shard_modified: list = []   # callbacks (the engine refreshes fp32 masters)
        self.plans = plan_buckets([p.numel() for p in params], bucket_numel, world)
        dtype, device = params[0].dtype, params[0].device
        self.shard = torch.empty(shard_numel(self.plans), dtype=dtype, device=device)
        self._shard_chunks = shard_chunks(self.plans, self.shard)
        self._shapes = [p.shape for p in params]
        full = torch.zeros(total_numel(self.plans), dtype=dtype, device=device)
        for view, p in zip(views_by_param(self.plans, self._shapes, full), params):
            view.copy_(p.detach())
        for plan, chunk in zip(self.plans, self._shard_chunks):
            start, length = plan.shard(rank)
            chunk.copy_(full.narrow(0, start, length))
        for p in params:
            p.ds_shape, p.ds_numel = tuple(p.shape), p.numel()
            p._hf_zero_group = self   # lets GatheredParameters find what to gather
        self.full = None
        self._empty = torch.empty(0, dtype=dtype, device=device)
        self.release()

    @property
    def dtype(self) -> torch.dtype:
        return self.shard.dtype

    @property
    def device(self) -> torch.device:
        return self.shard.device

    def storage_tensors(self) -> list[torch.Tensor]:
        return [self.shard] + ([self.full] if self.full is not None else [])

    def broadcast_tensors(self) -> list[torch.Tensor]:
        return []   # built from parameters already broadcast before sharding

    @property
    def gathered(self) -> bool:
        return self.full is not None

    def shard_chunks(self) -> list[torch.Tensor]:
        """Per bucket: this rank's chunk (views of ``shard``), what the optimizer updates."""
        return self._shard_chunks

    def gather(self, comm: Collectives) -> None:
        """All-gather the full parameters and point every ``param.data`` at them."""
        if self.full is not None:
            return
        full = torch.empty(total_numel(self.plans), dtype=self.dtype, device=self.shard.device)
        works = []
        for plan, chunk in zip(self.plans, self._shard_chunks):
            start, length = plan.shard(self.rank)
            mine = full.narrow(0, start, length)
            mine.copy_(chunk)
            works.append(comm.all_gather(full.narrow(0, plan.start, plan.padded_numel), mine, async_op=True))
        for work in works:
            work.wait()
        self.full = full
        for view, p in zip(views_by_param(self.plans, self._shapes, full), self.params):
            p.data = view

    def write_back_full(self) -> None:
        """Copy the (edited) gathered values into this rank's shard."""
        for plan, chunk in zip(self.plans, self._shard_chunks):
            start, length = plan.shard(self.rank)
            chunk.copy_(self.full.narrow(0, start, length))
        for callback in self.on_shard_modified:
            callback()

    def release(self) -> None:
        for p in self.params:
            p.data = self._empty
        self.full = None
