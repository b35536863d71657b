"""Rank functions for the diagnostics tests."""

from __future__ import annotations

import time

import torch

import hf_zero
from hf_zero.comm import Collectives
from hf_zero.diagnostics.divergence import CollectiveChecker, CollectiveDivergenceError
from parity_cases import MICRO, batch, tiny_gpt2


def _checked_comm(rank: int, world: int) -> Collectives:
    comm = Collectives()
    comm.checker = CollectiveChecker(None, rank, world, timeout_s=5)
    return comm


def diverging_kinds(rank: int, world: int) -> str:
    comm = _checked_comm(rank, world)
    comm.all_reduce_sum(torch.ones(4))            # #1 agrees
    start = time.monotonic()
    try:
        if rank == 0:
            comm.reduce_scatter_sum(torch.empty(2), torch.ones(4))
        else:
            comm.all_gather(torch.empty(4), torch.ones(2))
    except CollectiveDivergenceError as err:
        return f"{time.monotonic() - start:.1f}|{err}"
    return "no error"


def skipped_collective(rank: int, world: int) -> str:
    comm = _checked_comm(rank, world)
    comm.all_reduce_sum(torch.ones(3))
    if rank == 1:
        return "rank 1 returned early"            # never issues #2
    start = time.monotonic()
    try:
        comm.all_reduce_sum(torch.ones(3))
    except CollectiveDivergenceError as err:
        return f"{time.monotonic() - start:.1f}|{err}"
    return "no error"


def object_collectives_counted_and_checked(rank: int, world: int) -> tuple[dict, str]:
    """Barriers and object collectives are counted in comm_stats and seen by the detector."""
    comm = _checked_comm(rank, world)
    assert comm.broadcast_object(f"from {rank}") == "from 0"
    assert comm.all_gather_objects(rank) == list(range(world))
    comm.barrier()
    counted = comm.stats.snapshot()
    try:
        comm.barrier() if rank == 0 else comm.all_gather_objects(rank)   # #4 diverges
    except CollectiveDivergenceError as err:
        return counted, str(err)
    return counted, "no error"


def estimator_vs_measured(rank: int, world: int) -> dict:
    """Predicted model-state bytes against engine.memory_breakdown() for stages 0-2."""
    from hf_zero.diagnostics.estimator import model_state_bytes

    out = {}
    for stage in (0, 1, 2, 3):
        for bf16 in (False, True):
            model = tiny_gpt2(n_embd=96)
            psi = sum(p.numel() for p in model.parameters())   # before stage 3 empties them
            engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": MICRO, "bf16": {"enabled": bf16},
                                                "optimizer": {"params": {"lr": 1e-3}},
                                                "zero_optimization": {"stage": stage, "reduce_bucket_size": 20_000,
                                                                      "stage3_param_persistence_threshold": 0}})
            x = batch(rank, 0, 0)
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
            mem = engine.memory_breakdown()
            measured = mem["params"] + mem["grads"] + mem["master_params"] + mem["optimizer_states"]
            out[(stage, bf16)] = (measured, sum(model_state_bytes(stage, psi, world, bf16)))
            engine.destroy()
    return out


def engine_debug_mode_trains(rank: int, world: int) -> float:
    model = tiny_gpt2()
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": MICRO, "debug_collectives": True,
                                        "zero_optimization": {"stage": 2, "reduce_bucket_size": 3000}})
    assert engine.comm.checker is not None
    for step in range(2):
        x = batch(rank, step, 0)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    return engine.comm.checker.seq
