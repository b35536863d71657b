"""``hf_zero.GatheredParameters``: full stage-3 parameters inside a ``with`` block (DeepSpeed's semantics).

Every rank must enter the block (gathering is a collective). With ``modifier_rank=r``, the
values rank ``r`` holds when the block exits are broadcast and written back into every
rank's shard, for the parameters passed only; the fp32 masters of exactly those elements
are re-read once (engine_build.MasterReload), every other master stays bit-identical.
Parameters that are not partitioned (stages 0-2, frozen parameters outside stage 3) are
left as they are: there ``modifier_rank`` warns that the edit reaches neither the other
ranks nor the optimizer's masters.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator, Optional, Union

import torch

from hf_zero.sharded_params import sharded_group_of

logger = logging.getLogger(__name__)


def _groups_of(params: Iterable[torch.Tensor]) -> list:
    groups, seen = [], set()
    for p in params:
        group = sharded_group_of(p)
        if group is not None and id(group) not in seen:
            seen.add(id(group))
            groups.append(group)
    return groups


def _warn_not_partitioned(params: list[torch.Tensor], modifier_rank: int) -> None:
    if any(sharded_group_of(p) is None for p in params):
        logger.warning("hf_zero.GatheredParameters(modifier_rank=%d): %d of %d parameters are not partitioned "
                       "(ZeRO stage 0-2, or not managed by hf_zero); for them the call does nothing: an edit made "
                       "on rank %d is not broadcast and does not reach the optimizer's fp32 masters. Edit them on "
                       "every rank before hf_zero.initialize, or load the values with a checkpoint",
                       modifier_rank, sum(sharded_group_of(p) is None for p in params), len(params),
                       modifier_rank)


@contextlib.contextmanager
def GatheredParameters(params: Union[torch.Tensor, Iterable[torch.Tensor]], modifier_rank: Optional[int] = None,
                       enabled: bool = True) -> Iterator[None]:  # noqa: N802 (DeepSpeed's name)
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    groups = _groups_of(params) if enabled else []
    if enabled and modifier_rank is not None:
        _warn_not_partitioned(params, modifier_rank)
    newly = [g for g in groups if not g.gathered]
    for group in groups:
        if group in newly:
            group.gather(group.comm)
        else:
            group.wait()   # a prefetch may still be in flight: complete it (the stage releases it later)
    try:
        yield
    finally:
        if modifier_rank is not None:
            with torch.no_grad():
                for group in groups:
                    # HybridCollectives (mics_shard_size) broadcasts over every rank: each shard
                    # group's copy gets rank ``modifier_rank``'s values.
                    group.comm.broadcast(group.full, src_rank=modifier_rank)
                    group.write_back_full([p for p in params if sharded_group_of(p) is group])
        for group in newly:
            group.release()
