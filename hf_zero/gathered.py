"""``hf_zero.GatheredParameters``: full stage-3 parameters inside a ``with`` block (DeepSpeed's semantics).

Every rank must enter the block (gathering is a collective). With ``modifier_rank=r``, the
values rank ``r`` holds when the block exits are broadcast and written back into every
rank's shard (and fp32 master), so an in-place edit on one rank takes effect everywhere.
Parameters that are not partitioned (stages 0-2, frozen parameters) are left as they are.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Union

import torch


def _groups_of(params: Iterable[torch.Tensor]) -> list:
    groups, seen = [], set()
    for p in params:
        group = getattr(p, "_hf_zero_group", None)
        if group is not None and id(group) not in seen:
            seen.add(id(group))
            groups.append(group)
    return groups


@contextlib.contextmanager
def GatheredParameters(params: Union[torch.Tensor, Iterable[torch.Tensor]], modifier_rank: Optional[int] = None,
                       enabled: bool = True) -> Iterator[None]:  # noqa: N802 (DeepSpeed's name)
    if isinstance(params, torch.Tensor):
        params = [params]
    groups = _groups_of(params) if enabled else []
    newly = [g for g in groups if not g.gathered]
    for group in newly:
        group.gather(group.comm)
    try:
        yield
    finally:
        if modifier_rank is not None:
            with torch.no_grad():
                for group in groups:
                    group.comm.broadcast(group.full, src_rank=modifier_rank)
                    group.write_back_full()
        for group in newly:
            group.release()
