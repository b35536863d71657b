"""Pure integer math for flat buffers: bucket planning, padding and per-rank shards.

[Note: bucket-interleaved ownership]
Parameters of one optimizer group are laid out back to back in a flat buffer and packed
greedily into buckets of at most ``bucket_numel`` elements (a parameter larger than that
gets a bucket of its own; parameters never straddle buckets). Each bucket is padded to a
multiple of the partition world ``P`` and split into ``P`` equal chunks; rank ``r`` owns
chunk ``r`` of *every* bucket. A bucket is then exactly one ``reduce_scatter`` input and
one ``all_gather`` output, so reductions can fire bucket by bucket during backward and
land directly in the owner's shard, with no re-layout. Padding is < P per bucket.
Stage 0 uses ``P = 1``: every rank owns every bucket whole.
"""

from __future__ import annotations

from dataclasses import dataclass


def padded_numel(numel: int, world: int) -> int:
    """Smallest multiple of ``world`` that is >= ``numel``."""
    if numel < 0 or world < 1:
        raise ValueError(f"need numel >= 0 and world >= 1, got {numel}, {world}")
    return -(-numel // world) * world


@dataclass(frozen=True)
class BucketPlan:
    """One bucket of a flat buffer. Offsets are element offsets into that buffer."""

    start: int                       # first element of the bucket in the flat buffer
    numel: int                       # payload elements (sum of its parameters' numel)
    padded_numel: int                # numel rounded up to a multiple of the partition world
    world: int                       # partition world P
    param_indices: tuple[int, ...]   # indices into the group's parameter list, layout order
    param_offsets: tuple[int, ...]   # absolute offset of each parameter in the flat buffer

    @property
    def chunk_numel(self) -> int:
        return self.padded_numel // self.world

    @property
    def end(self) -> int:
        return self.start + self.padded_numel

    def shard(self, rank: int) -> tuple[int, int]:
        """(absolute offset, length) of the chunk owned by ``rank``."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside partition world {self.world}")
        return self.start + rank * self.chunk_numel, self.chunk_numel


def plan_buckets(numels: list[int], bucket_numel: int, world: int) -> list[BucketPlan]:
    """Pack parameters (in the given order) into padded buckets of at most ``bucket_numel``."""
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    groups: list[list[int]] = []
    current: list[int] = []
    current_numel = 0
    for index, numel in enumerate(numels):
        if current and current_numel + numel > bucket_numel:
            groups.append(current)
            current, current_numel = [], 0
        current.append(index)
        current_numel += numel
    if current:
        groups.append(current)

    plans: list[BucketPlan] = []
    start = 0
    for indices in groups:
        offsets, cursor = [], start
        for index in indices:
            offsets.append(cursor)
            cursor += numels[index]
        numel = cursor - start
        padded = padded_numel(numel, world)
        plans.append(BucketPlan(start, numel, padded, world, tuple(indices), tuple(offsets)))
        start += padded
    return plans


def total_numel(plans: list[BucketPlan]) -> int:
    """Elements of the whole flat buffer (payload and padding)."""
    return plans[-1].end if plans else 0


def shard_numel(plans: list[BucketPlan]) -> int:
    """Elements one rank owns across all buckets."""
    return sum(p.chunk_numel for p in plans)


def overlap(a_start: int, a_len: int, b_start: int, b_len: int) -> tuple[int, int]:
    """(start, length) of the intersection of two ranges; length 0 when disjoint."""
    start = max(a_start, b_start)
    end = min(a_start + a_len, b_start + b_len)
    return start, max(0, end - start)
