"""Sub-group planning for offloaded optimizer steps (pure integer math).

The optimizer steps this rank's master chunks (``MasterWeights.masters``: per parameter
group, per bucket, one 1D fp32 tensor). An offload backend updates them in *sub-groups* of
at most ``sub_group_size`` elements: consecutive slices of those chunks, packed greedily in
chunk order, a chunk larger than the limit being split. One sub-group is the unit of host
work, of NVMe I/O and of overlap (swap in i+1 / write back i-1 while i is updated).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slice:
    group: int      # parameter-group index (masters[group])
    chunk: int      # chunk index within the group (masters[group][chunk])
    start: int      # first element inside the chunk
    length: int
    offset: int     # first element inside the sub-group's contiguous buffer


@dataclass(frozen=True)
class SubGroup:
    index: int
    slices: tuple[Slice, ...]
    numel: int


def plan_sub_groups(chunk_numels: list[list[int]], sub_group_size: int) -> list[SubGroup]:
    """Pack the chunks (``chunk_numels[group][chunk]``) into sub-groups of at most
    ``sub_group_size`` elements, in order, covering every element exactly once."""
    if sub_group_size < 1:
        raise ValueError(f"sub_group_size must be >= 1, got {sub_group_size}")
    groups: list[SubGroup] = []
    current: list[Slice] = []
    filled = 0

    def close() -> None:
        nonlocal current, filled
        if current:
            groups.append(SubGroup(len(groups), tuple(current), filled))
        current, filled = [], 0

    for gi, numels in enumerate(chunk_numels):
        for ci, numel in enumerate(numels):
            start = 0
            while start < numel:
                if filled == sub_group_size:
                    close()
                length = min(numel - start, sub_group_size - filled)
                current.append(Slice(gi, ci, start, length, filled))
                filled += length
                start += length
    close()
    return groups


def max_sub_group_numel(plan: list[SubGroup]) -> int:
    return max((sg.numel for sg in plan), default=0)
