"""comm.py's presence check ([Note: presence check]) on an in-process store, ranks as threads:
all ranks pass, a lone caller raises naming the absent ranks, round numbers stay in step after
a lone call, a late arrival after a give-up starts a new round, and different calls are refused."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from hf_zero.presence import PresenceRounds, RanksAbsent


def _ranks(world: int) -> list[PresenceRounds]:
    store = dist.HashStore()
    return [PresenceRounds(dist.PrefixStore("t/", store), r, list(range(world))) for r in range(world)]


def _enter_all(rounds: list[PresenceRounds], calls: dict[int, str], timeout_s: float = 5.0,
               delays: dict[int, float] | None = None) -> dict[int, object]:
    """Each rank in ``calls`` enters its call in a thread; rank -> None (passed) or the error."""
    results: dict[int, object] = {}

    def run(rank: int) -> None:
        time.sleep((delays or {}).get(rank, 0.0))
        try:
            rounds[rank].enter(calls[rank], timeout_s, "do X instead.")
            results[rank] = None
        except RanksAbsent as err:
            results[rank] = err

    threads = [threading.Thread(target=run, args=(r,)) for r in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a rank is stuck"
    return results


def test_every_rank_entering_passes_repeatedly():
    rounds = _ranks(3)
    for _ in range(3):
        assert _enter_all(rounds, {0: "a", 1: "a", 2: "a"}) == {0: None, 1: None, 2: None}


def test_a_lone_call_raises_naming_the_absent_ranks_then_every_rank_meets_in_the_next_round():
    rounds = _ranks(3)
    start = time.monotonic()
    lone = _enter_all(rounds, {0: "save"}, timeout_s=0.3)
    assert time.monotonic() - start < 5
    assert "rank(s) [1, 2] did not enter it" in str(lone[0]) and "do X instead." in str(lone[0])
    # ranks 1 and 2 never saw round 1; their next call skips it and meets rank 0's next call
    assert _enter_all(rounds, {0: "save", 1: "save", 2: "save"}) == {0: None, 1: None, 2: None}
    assert _enter_all(rounds, {0: "save", 1: "save", 2: "save"}) == {0: None, 1: None, 2: None}


def test_two_of_three_waiting_both_raise_and_a_late_rank_starts_a_new_round():
    rounds = _ranks(3)
    first = _enter_all(rounds, {0: "s", 1: "s"}, timeout_s=0.3)
    assert all("rank(s) [2]" in str(first[r]) for r in (0, 1))
    # rank 2 arrives after the give-up: it is not let through alone; it waits in the next round
    late = _enter_all(rounds, {2: "s"}, timeout_s=0.3)
    assert "rank(s) [0, 1]" in str(late[2])
    assert _enter_all(rounds, {0: "s", 1: "s", 2: "s"}) == {0: None, 1: None, 2: None}


def test_a_rank_arriving_within_the_timeout_completes_the_round():
    rounds = _ranks(2)
    assert _enter_all(rounds, {0: "s", 1: "s"}, timeout_s=3.0, delays={1: 0.5}) == {0: None, 1: None}


def test_different_calls_in_one_round_raise_on_every_rank():
    rounds = _ranks(2)
    results = _enter_all(rounds, {0: "model.state_dict()", 1: "model.save_pretrained()"})
    assert all(isinstance(results[r], RanksAbsent) and "different calls" in str(results[r]) for r in (0, 1))
    assert _enter_all(rounds, {0: "a", 1: "a"}) == {0: None, 1: None}


@pytest.mark.parametrize("seed", range(4))
def test_give_up_racing_the_last_arrival_never_splits_the_ranks(seed):
    """Rank 1 arrives right at rank 0's timeout: either both pass or rank 0 raises and rank 1
    moves to the next round (where it waits, then raises alone) -- never one passing alone."""
    rounds = _ranks(2)
    results = _enter_all(rounds, {0: "s", 1: "s"}, timeout_s=0.2, delays={1: 0.19 + 0.01 * seed})
    assert (results[0] is None) == (results[1] is None)
