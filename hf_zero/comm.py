"""Every collective hf_zero issues goes through here, so a step's traffic can be counted.

[Note: how bytes are counted]
``CommStats`` records the *logical payload* of each call, the quantity ZeRO's theory is
stated in: ``all_reduce`` counts 2x the tensor (a ring all-reduce is a reduce-scatter plus
an all-gather), ``reduce_scatter`` counts its input, ``all_gather`` its output and
``broadcast`` and ``all_to_all`` their (input) tensor. So one step of stage 0-2 counts 2x the model bytes, stage 3 3x.

With a world of one (no process group) every call is a local no-op that counts nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


class _DoneWork:
    """Work handle for calls that needed no communication."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@dataclass
class CommStats:
    """Bytes and call counts per collective kind since the last reset."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, kind: str, num_bytes: int) -> None:
        self.bytes[kind] += num_bytes
        self.calls[kind] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        kinds = sorted(self.calls)
        return {k: {"bytes": self.bytes[k], "calls": self.calls[k]} for k in kinds}

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Collectives:
    """The collectives of one data-parallel group, each counted in ``stats``."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, stats: Optional[CommStats] = None):
        self.group = group
        self.stats = stats if stats is not None else CommStats()
        initialized = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if initialized else 1
        self.rank = dist.get_rank(group) if initialized else 0
        self.checker = None   # diagnostics.divergence.CollectiveChecker in debug mode

    def _check(self, kind: str, tensor: torch.Tensor) -> None:
        if self.checker is not None:
            self.checker.check(kind, tensor)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor, async_op: bool = False):
        if not self.active:
            return _DoneWork()
        self._check("all_reduce_sum", tensor)
        self.stats.record("all_reduce", 2 * _nbytes(tensor))
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)
        return work if async_op else _DoneWork()

    def all_reduce_max(self, tensor: torch.Tensor):
        if not self.active:
            return _DoneWork()
        self._check("all_reduce_max", tensor)
        self.stats.record("all_reduce", 2 * _nbytes(tensor))
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return _DoneWork()

    def reduce_scatter_sum(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        """``output`` (1D, numel/world) receives this rank's chunk of the sum of ``input``."""
        if not self.active:
            output.copy_(input)
            return _DoneWork()
        self._check("reduce_scatter", input)
        self.stats.record("reduce_scatter", _nbytes(input))
        work = dist.reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=self.group,
                                          async_op=async_op)
        return work if async_op else _DoneWork()

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        """``output`` (1D, world x input) receives every rank's ``input``; in place is allowed
        when ``input`` is this rank's chunk of ``output``."""
        if not self.active:
            if input.data_ptr() != output.data_ptr():
                output.copy_(input)
            return _DoneWork()
        self._check("all_gather", output)
        self.stats.record("all_gather", _nbytes(output))
        work = dist.all_gather_single(output, input, group=self.group, async_op=async_op)
        return work if async_op else _DoneWork()

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        """Equal splits: chunk i of ``input`` goes to rank i; chunk j of ``output`` comes from rank j."""
        if not self.active:
            output.copy_(input)
            return _DoneWork()
        self._check("all_to_all", input)
        self.stats.record("all_to_all", _nbytes(input))
        work = dist.all_to_all_single(output, input, group=self.group, async_op=async_op)
        return work if async_op else _DoneWork()

    def broadcast(self, tensor: torch.Tensor, src_rank: int = 0) -> None:
        if not self.active:
            return
        self._check("broadcast", tensor)
        self.stats.record("broadcast", _nbytes(tensor))
        src = dist.get_global_rank(self.group, src_rank) if self.group is not None else src_rank
        dist.broadcast(tensor, src=src, group=self.group)
