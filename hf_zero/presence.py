"""Presence check: a stage-3 call that gathers on every rank, entered by some ranks only.

It talks to torch.distributed's key-value store, never to a collective, so it lives beside
comm.py rather than in it (tests/test_collective_guard.py)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import weakref
from datetime import timedelta
from typing import Iterator, Optional

import torch.distributed as dist

from hf_zero.comm import Collectives

_GAVE_UP = 1 << 20   # added to a round's arrival count by a rank that stopped waiting (> any world size)


GATHERS = "gathers parameters that hf_zero stage 3 shards"   # why a call needs every rank (the default)

class RanksAbsent(RuntimeError):
    """A call that every rank must make (it gathers stage-3 parameters) was entered by only
    some ranks within the timeout; the ranks that came raise this."""


class PresenceRounds:
    """[Note: presence check]
    Calls that gather stage-3 parameters (``model.state_dict()``, ``model.save_pretrained``,
    ``engine.save_16bit_model``, accelerate's ``get_state_dict``) need every rank, but scripts
    often make them on rank 0 only (the DDP idiom ``if rank == 0: model.save_pretrained(d)``),
    and the first gather would then wait until the backend's timeout (NCCL cannot time out one
    call). So before gathering, each rank announces itself in torch.distributed's key-value
    store (the default group's store, under a prefix of its own), which does time out per call:

    - Calls are numbered in *rounds* shared by all ranks. A rank entering round ``n`` writes
      its call's name (the first name written is the round's: a rank in another call marks
      the round mismatched), then adds 1 to the round's arrival count; the rank that brings
      it to the group's size sets ``go``, the others wait for ``go`` up to the timeout.
    - A rank that times out adds ``_GAVE_UP`` to the same count. That one atomic counter
      decides every race: the round completed iff its last arrival came before the first
      give-up. A rank that gave up on a round that had in fact just completed proceeds; one
      whose give-up came first raises :class:`RanksAbsent`, naming the ranks whose names are
      missing, and sets ``go`` to "0" so that the other waiting ranks raise too.
    - A rank arriving at a round that already ended (given up, or complete without it) did
      not take part in it: it moves on to the next round. So a rank that never made the lone
      call (rank 1 while rank 0 called alone and raised) skips the dead round at its next
      call and meets the others in the following one: round numbers cannot drift apart.

    Remaining race (inherent to any presence check): a lone call is matched with the other
    ranks' *next* gathering call if they reach it before the lone call's timeout; if that
    next call is a different one (``state_dict`` vs ``save_pretrained``), every rank raises
    naming both instead of gathering in different orders. Nested calls (``save_pretrained``
    reaching ``save_16bit_model``) check once, at the outermost. Cost: a few store round
    trips per call, O(1) store operations per rank.
    """

    def __init__(self, store: "dist.Store", rank: int, ranks: list[int]):
        self.store, self.rank, self.ranks = store, rank, ranks
        self.next_round = 1   # a hint: rounds this rank never took part in are skipped on arrival

    def enter(self, call: str, timeout_s: float, instead: str, why: str = GATHERS) -> None:
        """Return once every rank of the group is in round ``n`` (this call), or raise."""
        world = len(self.ranks)
        while True:
            n = self.next_round
            self.next_round += 1
            self.store.set(f"{n}/rank/{self.rank}", call)
            first = self.store.compare_set(f"{n}/call", "", call).decode()
            if first != call:
                self.store.set(f"{n}/mismatch", f"rank {self.rank} entered {call}, another rank {first}")
            count = self.store.add(f"{n}/count", 1)
            if count >= _GAVE_UP or count > world:
                continue   # round n ended before this rank came: it is not part of it
            if count == world:
                self.store.set(f"{n}/go", "1")
            else:
                self._wait_or_give_up(n, call, timeout_s, instead, why)
            if self.store.check([f"{n}/mismatch"]):
                raise RanksAbsent(f"{call}: ranks entered different calls that gather stage-3 parameters "
                                  f"({self.store.get(f'{n}/mismatch').decode()}); every rank must make the same "
                                  f"calls in the same order. {instead}")
            return

    def _wait_or_give_up(self, n: int, call: str, timeout_s: float, instead: str, why: str) -> None:
        try:
            self.store.wait([f"{n}/go"], timedelta(seconds=timeout_s))
            if self.store.get(f"{n}/go") == b"1":
                return
            # another waiting rank gave up first: this rank raises the same error now
        except dist.DistStoreError:
            count = self.store.add(f"{n}/count", _GAVE_UP)
            if count // _GAVE_UP == 1 and count % _GAVE_UP >= len(self.ranks):
                return   # the last rank arrived before this give-up: the round completed
            self.store.set(f"{n}/go", "0")   # wakes the other waiting ranks: they raise too
        absent = [r for r in self.ranks if not self.store.check([f"{n}/rank/{r}"])]
        raise RanksAbsent(
            f"{call} {why}, so every rank must call it: rank(s) {absent} "
            f"did not enter it within {timeout_s:g} s (rank {self.rank} did). Call it on every rank, not under "
            f"`if rank == 0:`. {instead} (The wait is the config key `presence_timeout`.)")


_rounds: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # default group -> {namespace: rounds}


class _Nesting(threading.local):
    depth = 0   # all_ranks_call blocks this thread is inside


_nesting = _Nesting()


def _rounds_for(comm: Collectives) -> PresenceRounds:
    ranks = dist.get_process_group_ranks(comm.group) if comm.group is not None else list(range(comm.world_size))
    namespace = hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:16]
    # keyed by the default group: a new init_process_group starts a new store, so new rounds
    per_world = _rounds.setdefault(dist.group.WORLD, {})
    if namespace not in per_world:
        store = dist.PrefixStore(f"hf_zero/presence/{namespace}/", dist.distributed_c10d._get_default_store())
        per_world[namespace] = PresenceRounds(store, dist.get_rank(), ranks)
    return per_world[namespace]


@contextlib.contextmanager
def all_ranks_call(comm: Collectives, call: str, instead: str, timeout_s: Optional[float] = None,
                   why: str = GATHERS) -> Iterator[None]:
    """``with all_ranks_call(comm, "model.state_dict()", "..."):`` gather inside: proceeds once
    every rank of ``comm``'s group entered ``call``; raises :class:`RanksAbsent` on the ranks that
    came if some rank did not within ``timeout_s`` (default ``comm.presence_timeout_s``).
    ``instead`` says what to call instead. A call nested in another checks nothing.
    [Note: presence check]."""
    if not comm.active or _nesting.depth:
        yield
        return
    timeout = comm.presence_timeout_s if timeout_s is None else timeout_s
    _rounds_for(comm).enter(call, timeout, instead, why)
    _nesting.depth += 1
    try:
        yield
    finally:
        _nesting.depth -= 1
