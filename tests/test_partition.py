"""Property tests of the pure bucket/shard math (many random layouts, fixed seeds)."""

import random

import pytest

from hf_zero.partition import overlap, padded_numel, plan_buckets, shard_numel, total_numel


def random_layouts(count: int = 300):
    rng = random.Random(1234)
    for _ in range(count):
        numels = [rng.choice([1, 2, 3, 7, 64, 1000, 4231, rng.randint(1, 5000)])
                  for _ in range(rng.randint(1, 40))]
        yield numels, rng.randint(1, 6000), rng.randint(1, 5)


def test_buckets_cover_parameters_exactly_once():
    for numels, bucket_numel, world in random_layouts():
        plans = plan_buckets(numels, bucket_numel, world)
        seen = [i for p in plans for i in p.param_indices]
        assert seen == list(range(len(numels)))        # every parameter, in order, once
        cursor = 0
        for plan in plans:
            assert plan.start == cursor
            offset = plan.start
            for index, param_offset in zip(plan.param_indices, plan.param_offsets):
                assert param_offset == offset           # contiguous, never straddling buckets
                offset += numels[index]
            assert offset - plan.start == plan.numel
            assert plan.numel <= bucket_numel or len(plan.param_indices) == 1
            assert plan.padded_numel % world == 0 and 0 <= plan.padded_numel - plan.numel < world
            cursor = plan.end
        assert total_numel(plans) == cursor


def test_shards_tile_every_bucket_without_overlap():
    for numels, bucket_numel, world in random_layouts():
        plans = plan_buckets(numels, bucket_numel, world)
        for plan in plans:
            covered = []
            for rank in range(world):
                start, length = plan.shard(rank)
                covered.extend(range(start, start + length))
            assert covered == list(range(plan.start, plan.end))
        assert shard_numel(plans) * world == total_numel(plans)


def test_padded_numel_and_bad_input():
    assert [padded_numel(n, 4) for n in (0, 1, 4, 5)] == [0, 4, 4, 8]
    with pytest.raises(ValueError):
        padded_numel(3, 0)
    with pytest.raises(ValueError):
        plan_buckets([3], 0, 2)
    with pytest.raises(ValueError):
        plan_buckets([3], 10, 2)[0].shard(2)


def test_overlap():
    assert overlap(0, 10, 5, 10) == (5, 5)
    assert overlap(0, 5, 5, 10)[1] == 0
    assert overlap(3, 2, 0, 100) == (3, 2)
