"""Collective-divergence detector: ranks agree on every collective before issuing it.

Opt-in (config ``debug_collectives`` or ``HF_ZERO_DEBUG_COLLECTIVES=1``). Before each
collective, every rank publishes ``#seq kind shape dtype caller`` in the process group's
key-value store and reads every other rank's entry for the same ``#seq``. A mismatch raises
:class:`CollectiveDivergenceError` on every rank that sees it; a rank that has not arrived
within the timeout is named, with the last collective it did issue, instead of a hang.
"""

from __future__ import annotations

import itertools
import json
import sys
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

_HF_ZERO_DIR = str(Path(__file__).resolve().parent.parent)
_instances = itertools.count()   # same creation order on every rank -> same key namespace


class CollectiveDivergenceError(RuntimeError):
    """Ranks issued different collectives, or one stopped issuing them."""


def _caller() -> str:
    """The innermost hf_zero frame outside comm/diagnostics, and the first user frame."""
    frame: Optional[FrameType] = sys._getframe(2)
    inner = user = None
    while frame is not None:
        name = frame.f_code.co_filename
        where = f"{Path(name).name}:{frame.f_lineno} in {frame.f_code.co_name}"
        if name.startswith(_HF_ZERO_DIR):
            if inner is None and not name.endswith(("comm.py", "divergence.py")):
                inner = where
        elif user is None and "torch" not in name:
            user = where
            break
        frame = frame.f_back
    return " <- ".join(w for w in (inner, user) if w)


class CollectiveChecker:
    def __init__(self, group, rank: int, world_size: int, timeout_s: float = 60.0):
        store = dist.distributed_c10d._get_default_store()
        self.store = dist.PrefixStore(f"hf_zero/collectives/{next(_instances)}", store)
        self.rank, self.world_size = rank, world_size
        self.timeout = timedelta(seconds=timeout_s)
        self.seq = 0

    def check(self, kind: str, tensor: Optional[torch.Tensor] = None) -> None:
        """``tensor`` is None for object collectives and barriers: only the kind is compared."""
        self.seq += 1
        shape, dtype = ([], "object") if tensor is None else (list(tensor.shape), str(tensor.dtype))
        mine = {"kind": kind, "shape": shape, "dtype": dtype, "caller": _caller()}
        self.store.set(f"{self.seq}/{self.rank}", json.dumps(mine))
        self.store.set(f"last/{self.rank}", json.dumps({"seq": self.seq, **mine}))
        for other in range(self.world_size):
            if other == self.rank:
                continue
            key = f"{self.seq}/{other}"
            try:
                self.store.wait([key], self.timeout)
            except (dist.DistStoreError, RuntimeError):
                raise CollectiveDivergenceError(self._missing(other, mine)) from None
            theirs = json.loads(self.store.get(key))
            if [theirs[k] for k in ("kind", "shape", "dtype")] != [mine[k] for k in ("kind", "shape", "dtype")]:
                raise CollectiveDivergenceError(
                    f"collectives diverge at #{self.seq}: rank {self.rank} issued {_describe(mine)}, "
                    f"rank {other} issued {_describe(theirs)}")

    def _missing(self, other: int, mine: dict) -> str:
        last = "none"
        if self.store.check([f"last/{other}"]):
            entry = json.loads(self.store.get(f"last/{other}"))
            last = f"#{entry['seq']} {_describe(entry)}"
        return (f"rank {other} did not reach collective #{self.seq} within {self.timeout.total_seconds():.0f} s "
                f"(rank {self.rank} is issuing {_describe(mine)}); rank {other}'s last collective: {last}")


def _describe(entry: dict) -> str:
    return f"{entry['kind']}{tuple(entry['shape'])} {entry['dtype']} at {entry['caller']}"
