"""Every collective hf_zero issues goes through here, so a step's traffic can be counted.

[Note: how bytes are counted]
``CommStats`` records the *logical payload* of each call, the quantity ZeRO's theory is
stated in: ``all_reduce`` counts 2x the tensor (a ring all-reduce is a reduce-scatter plus
an all-gather), ``reduce_scatter`` counts its input, ``all_gather`` its output and
``broadcast`` and ``all_to_all`` their (input) tensor. So one step of stage 0-2 counts 2x the model bytes, stage 3 3x.
Object collectives (checkpoint agreement, fingerprints) count their pickled payload and
``barrier`` counts a call of zero bytes: they are rare and small, but no collective is missed.
A test (tests/test_collective_guard.py) fails if any other hf_zero module calls
``torch.distributed``'s collectives directly.

With a world of one (no process group) every call is a local no-op that counts nothing.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

import torch
import torch.distributed as dist

from hf_zero import _torch_compat
from hf_zero.device import backend_device_types

if TYPE_CHECKING:
    from hf_zero.diagnostics.divergence import CollectiveChecker


class _DoneWork:
    """Work handle for calls that needed no communication."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@dataclass
class CommStats:
    """Bytes and call counts per collective kind since the last reset, in total and per
    process group (its label: "world", or with ``mics_shard_size`` "shard" for traffic inside a
    group of k ranks and "replica" for traffic across groups)."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    group_bytes: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    group_calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def record(self, kind: str, num_bytes: int, group: str = "world") -> None:
        self.bytes[kind] += num_bytes
        self.calls[kind] += 1
        self.group_bytes[(group, kind)] += num_bytes
        self.group_calls[(group, kind)] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        kinds = sorted(self.calls)
        return {k: {"bytes": self.bytes[k], "calls": self.calls[k]} for k in kinds}

    def by_group(self) -> dict[str, dict[str, dict[str, int]]]:
        """{group label: {kind: {"bytes", "calls"}}}."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (group, kind) in sorted(self.group_calls):
            out.setdefault(group, {})[kind] = {"bytes": self.group_bytes[(group, kind)],
                                               "calls": self.group_calls[(group, kind)]}
        return out

    def group_total_bytes(self, group: str) -> int:
        return sum(n for (g, _), n in self.group_bytes.items() if g == group)

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.group_bytes.clear()
        self.group_calls.clear()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


DEFAULT_PRESENCE_TIMEOUT_S = 60.0   # presence.py: how long a gathering call waits for every rank


class Collectives:
    """The collectives of one data-parallel group, each counted in ``stats``."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, stats: Optional[CommStats] = None,
                 label: str = "world", presence_timeout_s: float = DEFAULT_PRESENCE_TIMEOUT_S):
        self.group = group
        self.label = label   # the process group's name in CommStats.by_group()
        self.stats = stats if stats is not None else CommStats()
        initialized = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if initialized else 1
        self.rank = dist.get_rank(group) if initialized else 0
        self.checker: Optional[CollectiveChecker] = None   # in debug mode (config debug_collectives)
        # how long presence.all_ranks_call waits for every rank (the engine passes config presence_timeout)
        self.presence_timeout_s = presence_timeout_s

    def _check(self, kind: str, tensor: Optional[torch.Tensor] = None) -> None:
        """``tensor`` is None for object collectives and barriers (no shape to compare)."""
        if self.checker is not None:
            self.checker.check(kind, tensor)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def data_parallel_size(self) -> int:
        """Ranks whose gradients a reduction sums (the group itself, or more with replicas)."""
        return self.world_size

    def small_tensor_device(self) -> torch.device:
        """Where a flag or seed tensor must live to go through this group: the host when the
        backend serves host tensors (gloo), else the current accelerator (NCCL serves only CUDA
        tensors; the engine made this rank's GPU current before its first collective)."""
        if not self.active or "cpu" in backend_device_types(dist.get_backend(self.group)):
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())   # CUDA-only branch (NCCL)

    def all_reduce_sum(self, tensor: torch.Tensor, async_op: bool = False):
        if not self.active:
            return _DoneWork()
        self._check("all_reduce_sum", tensor)
        self.stats.record("all_reduce", 2 * _nbytes(tensor), self.label)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)
        return work if async_op else _DoneWork()

    def all_reduce_max(self, tensor: torch.Tensor):
        if not self.active:
            return _DoneWork()
        self._check("all_reduce_max", tensor)
        self.stats.record("all_reduce", 2 * _nbytes(tensor), self.label)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return _DoneWork()

    def reduce_scatter_sum(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        """``output`` (1D, numel/world) receives this rank's chunk of the sum of ``input``."""
        if not self.active:
            output.copy_(input)
            return _DoneWork()
        self._check("reduce_scatter", input)
        self.stats.record("reduce_scatter", _nbytes(input), self.label)
        work = _torch_compat.reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=self.group,
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
        self.stats.record("all_gather", _nbytes(output), self.label)
        work = _torch_compat.all_gather_single(output, input, group=self.group, async_op=async_op)
        return work if async_op else _DoneWork()

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        """Equal splits: chunk i of ``input`` goes to rank i; chunk j of ``output`` comes from rank j."""
        if not self.active:
            output.copy_(input)
            return _DoneWork()
        self._check("all_to_all", input)
        self.stats.record("all_to_all", _nbytes(input), self.label)
        work = dist.all_to_all_single(output, input, group=self.group, async_op=async_op)
        return work if async_op else _DoneWork()

    def all_gather_objects(self, value: object) -> list:
        """Every rank's (small, picklable) ``value``; for agreement and diagnostics, not for tensors."""
        if not self.active:
            return [value]
        self._check("all_gather_object")
        out: list = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        self.stats.record("all_gather_object", sum(len(pickle.dumps(v)) for v in out))
        return out

    def broadcast_object(self, value: object, src_rank: int = 0) -> object:
        """Group rank ``src_rank``'s (small, picklable) ``value`` on every rank."""
        if not self.active:
            return value
        self._check("broadcast_object")
        box = [value]
        dist.broadcast_object_list(box, src=self._global_rank(src_rank), group=self.group)
        self.stats.record("broadcast_object", len(pickle.dumps(box[0])))
        return box[0]

    def barrier(self) -> None:
        if not self.active:
            return
        self._check("barrier")
        self.stats.record("barrier", 0)
        dist.barrier(group=self.group)

    def broadcast(self, tensor: torch.Tensor, src_rank: int = 0) -> None:
        """``tensor`` on every rank takes group rank ``src_rank``'s values."""
        if not self.active:
            return
        self._check("broadcast", tensor)
        self.stats.record("broadcast", _nbytes(tensor), self.label)
        dist.broadcast(tensor, src=self._global_rank(src_rank), group=self.group)

    def _global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank


class _ThenAcrossReplicas:
    """Work handle of a hybrid reduce-scatter: waiting completes the in-group reduce-scatter,
    then sums the received chunk across the replica groups (synchronously)."""

    def __init__(self, work, output: torch.Tensor, replicas: Collectives):
        self.work, self.output, self.replicas, self.done = work, output, replicas, False

    def wait(self) -> bool:
        if not self.done:
            self.work.wait()
            self.replicas.all_reduce_sum(self.output)
            self.done = True
        return True

    def is_completed(self) -> bool:
        return self.done


class HybridCollectives(Collectives):
    """``mics_shard_size``: the collectives of this rank's shard group (k consecutive ranks,
    which partition the model states), with every gradient reduce-scatter completed by an
    all-reduce of the received chunk across the replica group (the ranks with the same
    shard rank in every shard group). Broadcasts and object gathers span the whole world, so
    rank 0's weights reach every replica and agreements include every rank.
    [Note: hybrid sharding] in docs/design.md."""

    def __init__(self, shard_group: dist.ProcessGroup, replica_group: dist.ProcessGroup,
                 world: Collectives):
        super().__init__(shard_group, world.stats, label="shard")
        self.replicas = Collectives(replica_group, world.stats, label="replica")
        self.world = world

    @property
    def data_parallel_size(self) -> int:
        return self.world_size * self.replicas.world_size

    @property
    def replica_rank(self) -> int:
        """Which shard group this rank is in (0: the one that writes checkpoint pieces)."""
        return self.replicas.rank

    def reduce_scatter_sum(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False):
        work = _ThenAcrossReplicas(super().reduce_scatter_sum(output, input, async_op=True), output,
                                   self.replicas)
        if not async_op:
            work.wait()
        return work

    def all_gather_objects(self, value: object) -> list:
        return self.world.all_gather_objects(value)

    def broadcast(self, tensor: torch.Tensor, src_rank: int = 0) -> None:
        """From rank ``src_rank`` of the world (every replica starts from the same values)."""
        self.world.broadcast(tensor, src_rank)


class RankFailure(RuntimeError):
    """A rank-local step failed on at least one rank; every rank raises this same error."""


def agree_on_failure(comm: Collectives, error: Optional[BaseException], what: str,
                     error_class: type = RankFailure) -> None:
    """Every rank calls this after its rank-local work: one small all-reduce of an error flag
    and, only when some rank failed, a gather of the messages, so that every rank raises the
    same ``error_class`` naming each failed rank and its error instead of one raising and the
    others waiting in their next collective until the backend's timeout.
    [Note: ranks agree on failure] in docs/checkpoints.md."""
    if not comm.active:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=comm.small_tensor_device())
    comm.all_reduce_max(flag)
    if not flag.item():
        return
    mine = None if error is None else (type(error).__name__, str(error))
    reports = comm.all_gather_objects(mine)
    if error is not None and mine is not None and all(r is not None and r[0] == mine[0] for r in reports):
        raise error   # the same kind of failure everywhere (e.g. a bad config): each rank's own error
    reports = [None if r is None else f"{r[0]}: {r[1]}" for r in reports]
    failed = "; ".join(f"rank {rank}: {text}" for rank, text in enumerate(reports) if text is not None)
    raise error_class(f"{what} failed on rank(s) {[r for r, t in enumerate(reports) if t is not None]} "
                      f"(every rank raises this): {failed}") from error


class rank_local_step:  # noqa: N801 (used as a context manager, like contextlib's)
    """``with rank_local_step(comm, "save_checkpoint"): <rank-local work>``: the exception, if
    any, is held and every rank agrees on the outcome when the block ends."""

    def __init__(self, comm: Collectives, what: str, error_class: type = RankFailure):
        self.comm, self.what, self.error_class = comm, what, error_class

    def __enter__(self) -> "rank_local_step":
        return self

    def __exit__(self, kind, error, traceback) -> Literal[False]:   # never suppresses: a checker may rely on it
        if error is not None and not isinstance(error, Exception):
            return False   # KeyboardInterrupt / SystemExit: not something to agree on
        agree_on_failure(self.comm, error, self.what, self.error_class)
        return False   # no error anywhere (agree_on_failure raised otherwise): nothing to suppress


def rank_local_call(what: str):
    """Decorator for a rank-local function that every rank of the default process group calls
    before the engine exists (``hf_zero.from_pretrained``): its failure on some ranks is the
    same error on every rank (one 4-byte all-reduce when all succeed), instead of the others
    going on into ``initialize`` and waiting there until the backend's timeout."""
    def decorate(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            comm = Collectives(None)   # inactive without a process group (or at world 1)
            if comm.active and comm.small_tensor_device().type == "cuda" and "LOCAL_RANK" in os.environ:
                # CUDA-only branch (NCCL): the flag goes through this rank's GPU, which
                # initialize would make current anyway ([Note: device selection] in device.py).
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            result = None
            with rank_local_step(comm, what):
                result = function(*args, **kwargs)
            return result
        return call
    return decorate
