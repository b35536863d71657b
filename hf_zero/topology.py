"""Process groups for hybrid sharding (``zero_optimization.mics_shard_size``); builds groups only.

[Note: hybrid sharding] in docs/design.md: ranks ``[g*k, (g+1)*k)`` form shard group ``g``
(they partition the model states between them, as ZeRO does with N = k); ranks with the same
index in every shard group form a replica group (they hold the same shards and sum their
gradient chunks). With one node per shard group (k = LOCAL_WORLD_SIZE, torchrun numbering
ranks node by node) only the replica all-reduce crosses nodes.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch.distributed as dist

from hf_zero.comm import Collectives, HybridCollectives


class HybridShardingError(ValueError):
    """``mics_shard_size`` does not fit the process group."""


def shard_groups_layout(world: int, shard_size: int, key: str = "mics_shard_size"
                        ) -> tuple[list[list[int]], list[list[int]]]:
    """(shard groups, replica groups) as lists of group ranks; pure, for tests and the estimator."""
    if shard_size < 1 or world % shard_size:
        raise HybridShardingError(
            f"zero_optimization.{key} ({shard_size}) must divide the data-parallel world size "
            f"({world}): use a divisor of {world}, e.g. the GPUs per node, or leave the key unset to "
            "partition over all ranks")
    shards = [list(range(g * shard_size, (g + 1) * shard_size)) for g in range(world // shard_size)]
    replicas = [list(range(i, world, shard_size)) for i in range(shard_size)]
    return shards, replicas


def _warn_if_groups_straddle_nodes(shard_size: int, key: str = "mics_shard_size") -> None:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if local > 1 and shard_size % local and local % shard_size:
        warnings.warn(f"zero_optimization.{key} ({shard_size}) neither divides nor is a multiple of "
                      f"LOCAL_WORLD_SIZE ({local}): shard groups straddle nodes, so the all-gathers meant to "
                      f"stay on a node cross the inter-node link; use a divisor or multiple of {local}",
                      stacklevel=3)


def build_hybrid_collectives(world: Collectives, shard_size: int) -> Optional[HybridCollectives]:
    """The shard-group collectives for ``mics_shard_size``; None when it means plain sharding
    (-1, 0 or the whole world). Every rank creates every group in the same order, as
    ``dist.new_group`` requires."""
    if shard_size in (-1, 0) or shard_size == world.world_size:
        return None
    if world.group is not None and dist.get_world_size(world.group) != dist.get_world_size():
        raise HybridShardingError("zero_optimization.mics_shard_size needs the data-parallel group to be the "
                                  "whole world (the groups are built with torch.distributed.new_group)")
    shards, replicas = shard_groups_layout(world.world_size, shard_size)
    _warn_if_groups_straddle_nodes(shard_size)
    mine_shard = mine_replica = None
    for ranks in shards:
        group = dist.new_group(ranks)
        if world.rank in ranks:
            mine_shard = group
    for ranks in replicas:
        group = dist.new_group(ranks)
        if world.rank in ranks:
            mine_replica = group
    assert mine_shard is not None and mine_replica is not None, "every rank is in one group of each kind"
    return HybridCollectives(mine_shard, mine_replica, world)


def build_hpz_collectives(world: Collectives, partition_size: int) -> Optional[Collectives]:
    """``zero_hpz_partition_size``: the collectives of this rank's group of k consecutive ranks,
    over which every stage-3 parameter group keeps its secondary partition ([Note: hpZ
    secondary partition] in sharded_params.py); None when hpZ is off. Every rank creates
    every group in the same order, as ``dist.new_group`` requires."""
    if partition_size <= 1 or partition_size == world.world_size:
        return None
    if world.group is not None and dist.get_world_size(world.group) != dist.get_world_size():
        raise HybridShardingError("zero_optimization.zero_hpz_partition_size needs the data-parallel group to be "
                                  "the whole world (the groups are built with torch.distributed.new_group)")
    shards, _ = shard_groups_layout(world.world_size, partition_size, "zero_hpz_partition_size")
    _warn_if_groups_straddle_nodes(partition_size, "zero_hpz_partition_size")
    mine = None
    for ranks in shards:
        group = dist.new_group(ranks)
        if world.rank in ranks:
            mine = group
    return Collectives(mine, world.stats, label="shard")


def hybrid_sharding_problems(zero) -> list[tuple[str, str]]:
    """What ``mics_shard_size`` and ``zero_hpz_partition_size`` cannot be combined with yet
    (ConfigError entries)."""
    if zero.zero_hpz_partition_size > 1:
        hpz = "zero_optimization.zero_hpz_partition_size"
        if zero.stage != 3:
            return [(hpz, "hpZ (a secondary partition of gathered parameters) needs stage 3")]
        if zero.mics_shard_size not in (-1, 0):
            return [(hpz, "not implemented together with mics_shard_size")]
        if zero.offload_param.device != "none":
            return [(hpz, "not implemented with offload_param yet")]
    if zero.mics_shard_size in (-1, 0):
        return []
    if zero.stage == 0:
        return [("zero_optimization.mics_shard_size", "hybrid sharding needs stage 1, 2 or 3")]
    if zero.zero_quantized_gradients or zero.zero_quantized_weights:
        return [("zero_optimization.mics_shard_size", "not implemented with quantized communication yet")]
    if zero.offload_param.device != "none" or zero.offload_optimizer.device != "none":
        return [("zero_optimization.mics_shard_size", "not implemented with offload yet")]
    return []
