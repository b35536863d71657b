"""Sub-group planning for offloaded optimizer steps (pure integer math).

The optimizer steps this rank's master chunks (``MasterWeights.masters``: per parameter
group, per bucket, one 1D fp32 tensor). An offload backend updates them in *sub-groups* of
at most ``sub_group_size`` elements: consecutive slices of those chunks, packed greedily in
chunk order, a chunk larger than the limit being split. One sub-group is the unit of host
work, of NVMe I/O and of overlap (swap in i+1 / write back i-1 while i is updated).

[Note: split points]
Where a chunk is split, the split lies at a multiple of ``SPLIT_ALIGN`` elements from the
chunk's start. torch's fused CPU Adam runs a vectorised body and a scalar remainder whose
roundings differ (measured on AVX-512: a chunk of 100003 elements split at 1500 ends up
with a few elements one bit off after 3 steps; split at 1504 or any multiple of 8, none),
so a slice ending at an arbitrary element would update its last elements with other bits
than the whole chunk gets in the 'none' backend. With split points at multiples of 64
(a multiple of every CPU vector width and of the 16-float cache line the kernel's tasks
are cut at) every element takes the same path as in the whole-chunk update; a test checks
the result bit for bit against torch.optim.AdamW. A sub-group is therefore filled only
up to the last aligned point: at most 63 elements short of ``sub_group_size`` (a
``sub_group_size`` below 64 cannot be aligned and is packed exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

SPLIT_ALIGN = 64   # elements: where a chunk may be split ([Note: split points])


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


def plan_sub_groups(chunk_numels: list[list[int]], sub_group_size: int,
                    align: int = SPLIT_ALIGN) -> list[SubGroup]:
    """Pack the chunks (``chunk_numels[group][chunk]``) into sub-groups of at most
    ``sub_group_size`` elements, in order, covering every element exactly once; a chunk is
    split only at multiples of ``align`` from its start ([Note: split points])."""
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
                if length < numel - start and sub_group_size >= align:
                    length -= length % align
                    if length == 0:     # no aligned split point left in this sub-group
                        close()
                        continue
                current.append(Slice(gi, ci, start, length, filled))
                filled += length
                start += length
    close()
    return groups


def max_sub_group_numel(plan: list[SubGroup]) -> int:
    return max((sg.numel for sg in plan), default=0)
