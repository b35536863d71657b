"""A pretrained checkpoint broken on one rank only is the same error on every rank, within seconds
(2 gloo ranks, from_pretrained then initialize at stages 0 and 3)."""

import pytest

import pretrained_fault_cases as cases
from hf_zero.testing import run_on_ranks

_cache: dict = {}
FAST_S = 20.0   # a rank left in a collective would wait for the 120 s process-group timeout


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if "faults" not in _cache:
        root = tmp_path_factory.mktemp("pretrained_faults")
        good = cases.write_checkpoint(root)
        _cache["faults"] = run_on_ranks(cases.pretrained_faults, 2, good, str(root), timeout_s=200)
    return _cache["faults"]


def _same_error_everywhere(results, scenario, *needles):
    reports = [r[scenario] for r in results]
    assert all(rep["error"] == "RankFailure" for rep in reports), reports
    assert reports[0]["message"] == reports[1]["message"], reports
    for needle in ("rank(s) [1]", "rank1", *needles):
        assert needle in reports[0]["message"], (needle, reports[0]["message"])
    assert all(rep["seconds"] < FAST_S for rep in reports), reports


def test_directory_missing_on_rank_1(results):
    _same_error_everywhere(results, "missing_dir", "hf_zero.from_pretrained", "no model.safetensors")


def test_truncated_shard_on_rank_1(results):
    _same_error_everywhere(results, "truncated_shard", "hf_zero.from_pretrained", cases.SHARD, "truncated")


def test_unparsable_header_on_rank_1(results):
    _same_error_everywhere(results, "bad_header", "hf_zero.from_pretrained", cases.SHARD,
                           "not a readable safetensors file")


def test_shape_mismatch_on_rank_1_only(results):
    _same_error_everywhere(results, "wrong_shape", "hf_zero.from_pretrained", "shape mismatch")


@pytest.mark.parametrize("stage", (0, 3))
def test_read_failure_while_initialize_builds_the_model(results, stage):
    _same_error_everywhere(results, f"read_stage{stage}", "reading the pretrained weights", cases.SHARD,
                           "truncated", "loading parameter")


def test_ranks_still_work_together_afterwards(results):
    assert all(r["afterwards"]["error"] is None for r in results), [r["afterwards"] for r in results]
