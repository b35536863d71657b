"""One rank's failure is every rank's error (2 gloo ranks, only one of them failing)."""

import pytest

import fault_agreement_cases as cases
import hf_zero
from hf_zero.testing import run_on_ranks
from parity_cases import tiny_gpt2

_cache: dict = {}
FAST_S = 20.0   # a rank left in a collective would wait for the 120 s process-group timeout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if "checkpoint" not in _cache:
        root = tmp_path_factory.mktemp("faults")
        _cache["checkpoint"] = run_on_ranks(cases.checkpoint_faults, 2, str(root), timeout_s=300)
    return _cache["checkpoint"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if "setup" not in _cache:
        _cache["setup"] = run_on_ranks(cases.setup_faults, 2, str(tmp_path_factory.mktemp("swap")), timeout_s=300)
    return _cache["setup"]


def _same_error_everywhere(results, scenario, error, *needles):
    reports = [r[scenario] for r in results]
    assert all(rep["error"] == error for rep in reports), reports
    assert reports[0]["message"] == reports[1]["message"]
    for needle in needles:
        assert needle in reports[0]["message"], (needle, reports[0]["message"])
    assert all(rep["seconds"] < FAST_S for rep in reports), reports


def test_disk_full_on_rank_1_is_the_same_error_on_both_ranks(checkpoint):
    _same_error_everywhere(checkpoint, "save", "CheckpointError", "rank 1", "rank_00001.safetensors",
                           "No space left")


def test_failed_save_leaves_previous_checkpoint_and_latest(checkpoint):
    for r in checkpoint:
        assert r["after_save"] == {"latest": "good", "broken_exists": False, "leftovers": []}
        assert r["previous_loads"]["error"] is None, r["previous_loads"]


def test_corrupt_shard_on_rank_1_is_the_same_error_on_both_ranks(checkpoint):
    _same_error_everywhere(checkpoint, "load", "CheckpointError", "rank 1", "rank_00001.safetensors", "corrupted")
    for r in checkpoint:
        assert r["good_still_loads"]["error"] is None, r["good_still_loads"]


def test_export_write_failure_on_the_writer_is_every_ranks_error(checkpoint):
    _same_error_everywhere(checkpoint, "export", "RankFailure", "rank 0", "No space left")


def test_checkpoint_call_on_rank_0_alone_raises_naming_rank_1_and_then_both_ranks_save(checkpoint):
    for scenario, call in (("lone_save", "engine.save_checkpoint()"), ("lone_load", "engine.load_checkpoint()")):
        report = checkpoint[0][scenario]
        assert report["error"] == "RanksAbsent", report
        assert call in report["message"] and "rank(s) [1]" in report["message"], report["message"]
        assert report["seconds"] < cases.LONE_TIMEOUT_S + 10, report
    assert not any(r["lone_wrote"] for r in checkpoint)
    assert all(r["together"]["error"] is None for r in checkpoint), [r["together"] for r in checkpoint]


@pytest.mark.parametrize("scenario", ("nvme", "param_nvme"))   # optimizer offload, parameter offload
def test_unusable_nvme_path_on_rank_1_is_the_same_error_on_both_ranks(setup, scenario):
    _same_error_everywhere(setup, scenario, "RankFailure", "rank 1", "missing", "does not exist")


def test_different_models_are_named_at_initialize(setup):
    _same_error_everywhere(setup, "model", "RankFailure", "rank 0 and rank 1", "parameters")


def test_different_configs_are_named_at_initialize(setup):
    _same_error_everywhere(setup, "config", "RankFailure", "zero_optimization.reduce_bucket_size")


def test_ranks_still_work_together_after_agreed_failures(setup):
    assert all(r["afterwards"]["error"] is None for r in setup), [r["afterwards"] for r in setup]


def test_launcher_without_process_group_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="init_process_group"):
        hf_zero.initialize(tiny_gpt2(), cases.CONFIG)
