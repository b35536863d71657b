"""One contiguous 1D buffer per optimizer parameter group, with per-parameter views.

No collectives here: this module only owns storage and layout (see partition.py for the
[Note: bucket-interleaved ownership] the layout follows).
"""

from __future__ import annotations

import torch
from torch import nn

from hf_zero.partition import BucketPlan, plan_buckets, total_numel


def views_by_param(plans: list[BucketPlan], shapes: list[torch.Size], buffer: torch.Tensor) -> list[torch.Tensor]:
    """Views of a flat ``buffer`` laid out by ``plans``, one per parameter, shaped ``shapes[i]``."""
    # Placeholders: the plans cover every parameter, so each slot is filled below.
    views: list[torch.Tensor] = [None] * len(shapes)  # type: ignore[list-item]
    for plan in plans:
        for index, offset in zip(plan.param_indices, plan.param_offsets):
            numel = 1
            for d in shapes[index]:
                numel *= d
            views[index] = buffer.narrow(0, offset, numel).view(shapes[index])
    return views


def shard_chunks(plans: list[BucketPlan], shard: torch.Tensor) -> list[torch.Tensor]:
    """Per bucket, the view of a rank's shard buffer (its chunks back to back) holding that chunk."""
    chunks, cursor = [], 0
    for plan in plans:
        chunks.append(shard.narrow(0, cursor, plan.chunk_numel))
        cursor += plan.chunk_numel
    return chunks


class FlatParamGroup:
    """The trainable parameters of one optimizer param group, flattened in place.

    After construction each ``param.data`` is a view into ``self.data``, so writing into a
    bucket of ``self.data`` (e.g. an all-gather) updates the model's parameters directly.
    """

    params: list[nn.Parameter]   # layout order (reverse registration: backward-ready order)
    names: list[str]
    plans: list[BucketPlan]
    data: torch.Tensor           # 1D, model dtype, each bucket padded to the partition world

    def __init__(self, params: list[nn.Parameter], names: list[str], bucket_numel: int,
                 partition_world: int):
        if not params:
            raise ValueError("a flat parameter group needs at least one parameter")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"parameters of one group must share dtype and device, got "
                             f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        self.params = params
        self.names = names
        self._shapes = [p.shape for p in params]
        self.plans = plan_buckets([p.numel() for p in params], bucket_numel, partition_world)
        self.data = torch.zeros(total_numel(self.plans), dtype=params[0].dtype, device=params[0].device)
        for index, view in enumerate(self.param_views(self.data)):
            view.copy_(params[index].detach())
            params[index].data = view

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def storage_tensors(self) -> list[torch.Tensor]:
        """What this group holds now (for memory accounting)."""
        return [self.data]

    def broadcast_tensors(self) -> list[torch.Tensor]:
        """What must be broadcast from rank 0 so every rank starts identical."""
        return [self.data]

    def param_views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``buffer`` (same layout as ``data``) shaped like each parameter."""
        return views_by_param(self.plans, self._shapes, buffer)

    def bucket(self, buffer: torch.Tensor, plan: BucketPlan) -> torch.Tensor:
        return buffer.narrow(0, plan.start, plan.padded_numel)

    def chunk(self, buffer: torch.Tensor, plan: BucketPlan, rank: int) -> torch.Tensor:
        offset, length = plan.shard(rank)
        return buffer.narrow(0, offset, length)
