"""Stage-3 prefetch: replay the recorded order of unit gathers and gather ahead of use.

[Note: stage-3 prefetch]
A *pass* runs from the model's forward pre-hook to the end of its backward (or, with no
graph, to the end of the forward). Every unit request in a pass is appended to a trace,
kept per pass kind (training / no-grad), so evaluation does not overwrite the training
order. In the next pass of the same kind each request is compared with the recorded
trace: while they agree, after serving the request the stage starts (asynchronous)
all-gathers of the units that come next in the trace, as long as the units gathered
ahead but not yet requested stay within ``stage3_prefetch_bucket_size`` elements and all
gathered units within ``stage3_max_live_parameters``. The look-ahead stops at a unit that
is gathered now (it is in use; e.g. the turn from the last block's forward to its
backward) and at the end of the trace: never across an optimizer step, which would fetch
stale weights. On the first disagreement prefetching stops for the rest of the pass and
the new order is recorded, so a changed forward path costs only the overlap, never
correctness. Every decision depends only on the trace and unit sizes, which are the same
on every rank, so all ranks issue the same collectives in the same order. A no-grad
pass nested between a training forward and its backward (stage3_pass.py) sets the
training pass aside and resumes it afterwards, so the backward still follows its trace.
"""

from __future__ import annotations

from typing import Callable, Sequence


class PrefetchPlanner:
    def __init__(self, prefetch_numel: int, max_live_numel: int):
        self.prefetch_numel = prefetch_numel
        self.max_live_numel = max_live_numel
        self._traces: dict[str, list[int]] = {}
        self._kind = ""
        self._current: list[int] = []
        self._following = False
        self._ahead: set[int] = set()      # units gathered ahead and not requested yet
        self.num_prefetched = 0            # units gathered ahead of use (diagnostics, tests)
        self.num_misses = 0                # passes whose order departed from the trace

    def start_pass(self, kind: str) -> None:
        self.end_pass()
        self._kind = kind
        self._following = kind in self._traces
        self._current = []
        self._ahead.clear()

    def end_pass(self) -> None:
        if self._current:
            self._traces[self._kind] = self._current
        self._current = []
        self._following = False
        self._ahead.clear()

    def suspend(self) -> tuple:
        """Set the running pass aside (a nested no-grad pass runs before its backward)."""
        state = (self._kind, self._current, self._following, set(self._ahead))
        self._current, self._following = [], False
        self._ahead.clear()
        return state

    def resume(self, state: tuple) -> None:
        """End the nested pass (recording its order) and continue the one set aside."""
        self.end_pass()
        self._kind, self._current, self._following, ahead = state
        self._ahead = ahead

    def on_request(self, unit: int) -> None:
        """Record a request; stop following the trace when it departs from it."""
        position = len(self._current)
        self._current.append(unit)
        self._ahead.discard(unit)
        if self._following:
            trace = self._traces[self._kind]
            if position >= len(trace) or trace[position] != unit:
                self._following = False
                self.num_misses += 1

    def next_request_is(self, unit: int) -> bool:
        """Whether the trace's next request is ``unit`` again (keep it gathered: the last
        block's forward is followed straight by its backward)."""
        if not self._following:
            return False
        trace = self._traces[self._kind]
        return len(self._current) < len(trace) and trace[len(self._current)] == unit

    @property
    def position(self) -> int:
        """How many requests this pass has made (the trace index of the next one)."""
        return len(self._current)

    def upcoming(self) -> Sequence[int]:
        """The rest of the recorded trace, in order (empty when not following one)."""
        if not self._following:
            return []
        return self._traces[self._kind][len(self._current):]

    def to_prefetch(self, numel_of: Callable[[int], int], live_numel: int,
                    is_gathered: Callable[[int], bool]) -> Sequence[int]:
        """Units to start gathering now (in trace order), given what is gathered already."""
        if not self._following:
            return []
        trace = self._traces[self._kind]
        ahead_numel = sum(numel_of(u) for u in self._ahead)
        chosen: list[int] = []
        for unit in trace[len(self._current):]:
            if unit in chosen or unit in self._ahead:
                continue
            if is_gathered(unit):
                break   # in use now: what follows is too far ahead
            numel = numel_of(unit)
            if ahead_numel + numel > self.prefetch_numel or live_numel + numel > self.max_live_numel:
                break
            chosen.append(unit)
            ahead_numel += numel
            live_numel += numel
        self._ahead.update(chosen)
        self.num_prefetched += len(chosen)
        return chosen
