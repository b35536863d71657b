"""Stage-3 behaviour beyond parity: sharded at rest, GatheredParameters, eval, generate, destroy."""

import pytest

import stage3_cases
from hf_zero.testing import run_on_ranks

_run: dict = {}


@pytest.fixture(scope="module")
def results():
    if not _run:
        _run.update(enumerate(run_on_ranks(stage3_cases.gathered_and_eval, 2, timeout_s=300)))
    return _run


@pytest.mark.parametrize("key", ["at_rest_empty", "ds_shape", "gathered_equal", "released_after", "eval_close",
                                 "released_after_eval", "edit_everywhere", "train_after", "destroy_whole"])
def test_stage3_behaviour(results, key):
    for rank, r in results.items():
        assert r[key], f"rank {rank}: {key}"


def test_generate_with_different_lengths_per_rank_does_not_hang(results):
    # rank 0 asks for 2 new tokens, rank 1 for 5: both return (the run would time out otherwise)
    assert results[0]["generated_len"] == 4 + 2 and results[1]["generated_len"] == 4 + 5
