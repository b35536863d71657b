"""The multi-process harness never hangs: a failing or stuck rank ends the run promptly."""

import time

import pytest

from hf_zero.testing import run_on_ranks


def _rank1_raises(rank, world):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 would wait here forever without the harness
    return rank


def _rank1_hangs(rank, world):
    if rank == 1:
        time.sleep(3600)
    return rank


def _collect(rank, world):
    import torch
    import torch.distributed as dist

    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def test_results_come_back_by_rank():
    assert run_on_ranks(_collect, 2, timeout_s=120) == [3.0, 3.0]


def test_failing_rank_is_reported_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed.*boom on rank 1"):
        run_on_ranks(_rank1_raises, 2, timeout_s=120)
    assert time.monotonic() - start < 60


def test_stuck_rank_times_out_and_is_killed():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\]"):
        run_on_ranks(_rank1_hangs, 2, timeout_s=15)
    assert time.monotonic() - start < 60
