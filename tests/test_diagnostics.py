"""Estimator validated against measured bytes, the per-step report, the divergence detector."""

import logging

import pytest

import diagnostics_cases as dc
from hf_zero.diagnostics.estimator import ModelShape, deepspeed_estimate, estimate, largest_model_fitting
from hf_zero.testing import run_on_ranks


def test_estimator_matches_memory_breakdown_within_5_percent():
    for results in run_on_ranks(dc.estimator_vs_measured, 2, timeout_s=300):
        for (stage, bf16), (measured, predicted) in results.items():
            assert abs(measured / predicted - 1) <= 0.05, (stage, bf16, measured, predicted)


def test_divergent_collectives_raise_on_every_rank():
    results = run_on_ranks(dc.diverging_kinds, 2, timeout_s=120)
    for rank, text in enumerate(results):
        seconds, message = text.split("|", 1)
        assert "diverge at #2" in message and "reduce_scatter" in message and "all_gather" in message, message
        assert float(seconds) < 5


def test_a_missing_rank_is_named_instead_of_a_hang():
    results = run_on_ranks(dc.skipped_collective, 2, timeout_s=120)
    assert results[1] == "rank 1 returned early"
    seconds, message = results[0].split("|", 1)
    assert "rank 1 did not reach collective #2" in message and "#1 all_reduce_sum" in message, message
    assert 4 <= float(seconds) < 30


def test_object_collectives_and_barriers_are_counted_and_checked():
    for counted, message in run_on_ranks(dc.object_collectives_counted_and_checked, 2, timeout_s=120):
        assert {k: v["calls"] for k, v in counted.items()} == \
            {"broadcast_object": 1, "all_gather_object": 1, "barrier": 1}, counted
        assert counted["all_gather_object"]["bytes"] > 0 and counted["broadcast_object"]["bytes"] > 0
        assert "diverge at #4" in message and "barrier" in message and "all_gather_object" in message, message


def test_debug_mode_is_transparent_to_training():
    seqs = run_on_ranks(dc.engine_debug_mode_trains, 2, timeout_s=300)
    assert seqs[0] == seqs[1] > 4


def test_step_report_logs_phases_tokens_and_memory(caplog):
    import hf_zero
    from parity_cases import batch, tiny_gpt2

    engine = hf_zero.initialize(tiny_gpt2(), {"train_micro_batch_size_per_gpu": 2, "wall_clock_breakdown": True,
                                              "memory_breakdown": True, "steps_per_print": 2,
                                              "zero_optimization": {"stage": 1}})
    with caplog.at_level(logging.INFO, logger="hf_zero"):
        for step in range(4):
            x = batch(0, step, 0)
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
    reports = [r.getMessage() for r in caplog.records if "hf_zero step" in r.getMessage()]
    assert [m.split(":")[0] for m in reports] == ["hf_zero step 2", "hf_zero step 4"]
    report = engine.last_report
    for phase in ("forward", "backward", "optimizer", "allgather"):
        assert report[f"time/{phase}_s"] > 0
    assert report["tokens_per_sec"] > 0 and report["memory/total_bytes"] == engine.memory_breakdown()["total"]
    assert report["time/step_s"] >= report["time/forward_s"] + report["time/backward_s"]


def test_timers_are_off_by_default():
    import hf_zero
    from parity_cases import tiny_gpt2

    engine = hf_zero.initialize(tiny_gpt2(), {"train_micro_batch_size_per_gpu": 2})
    assert engine.timers is None and engine.stage.timers is None and engine.comm.checker is None


def test_estimates_follow_zero_and_offload_moves_states():
    shape = ModelShape(1_000_000, 64, 2, 2, 100, 10_000)
    none = estimate(shape, 4, 2, "none", mixed=True)
    cpu = estimate(shape, 4, 2, "cpu", mixed=True)
    assert none.device_model_states == 2e6 + 14e6 / 4
    # masters + Adam (12 bytes per owned parameter) move to the host; gradient partitions stay
    assert cpu.device_model_states == 2e6 + 2e6 / 4 and cpu.host_model_states == 12e6 / 4
    nvme = estimate(shape, 4, 2, "nvme", mixed=True, sub_group_size=10_000, buffer_count=4)
    assert nvme.nvme_model_states == pytest.approx(12e6 / 4, rel=0.05)   # + 4 KiB I/O padding per region
    # four buffers of one sub-group's 3 regions, each padded to 4 KiB, plus 4 KiB alignment slack
    assert nvme.host_model_states == 4 * (3 * 40_960 + 4096)
    assert estimate(shape, 4, 3, "cpu").device_model_states == 2e6 / 4   # only the gradient partition
    assert estimate(shape, 4, 2, "none").activations_checkpointed < estimate(shape, 4, 2, "none").activations
    assert largest_model_fitting(16e9, 8, 3, "none", True) == pytest.approx(8e9)
    # DeepSpeed's ZeRO-2 estimate (4 Psi + 16 Psi / N) vs ZeRO's 2 Psi + 14 Psi / N: theirs keeps
    # fp32 grads full; both agree that stage 3 with everything offloaded leaves the largest layer.
    assert deepspeed_estimate(2, 1_000_000, 0, 4, "none") == 8e6
    assert deepspeed_estimate(3, 1_000_000, 10_000, 4, "cpu") == 40_000


def test_cli_estimate_and_env(capsys):
    from hf_zero.cli import main

    assert main(["estimate", "gpt2", "--set", '{"n_layer": 2, "n_embd": 64, "n_head": 2}', "--world-size", "2",
                 "--device-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "| 3 | nvme |" in out and "largest model fitting" in out
    assert main(["env"]) == 0
    assert "distributed backends" in capsys.readouterr().out
