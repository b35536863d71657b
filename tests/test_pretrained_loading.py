"""hf_zero.from_pretrained loads every layout transformers loads, to the same logits (2 gloo ranks, stages 0 and 3)."""

import pytest

import pretrained_cases as cases
from hf_zero.testing import run_on_ranks

_cache: dict = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if "load" not in _cache:
        dirs = cases.write_checkpoints(tmp_path_factory.mktemp("layouts"))
        _cache["load"] = run_on_ranks(cases.load_against_transformers, 2, dirs, timeout_s=400)
    return _cache["load"]


def _needs_model_type(name: str) -> None:
    """make test-compat runs an older transformers, which may not have this model type yet."""
    if cases.unknown_to_transformers(name):
        import transformers

        pytest.skip(f"model type {cases.MODEL_TYPES[name]} is not in transformers {transformers.__version__}")


@pytest.mark.parametrize("stage", cases.STAGES)
# (the missing-key checkpoint is left out: its missing parameter is freshly initialised on both sides)
@pytest.mark.parametrize("name", ("gpt2", "gpt2_no_prefix", "llama_sharded", "mixtral", "qwen2_moe", "hrm_text",
                                  "sarvam_moe", "olmo_hybrid", "gpt2_extra_key"))
def test_logits_equal_transformers_from_pretrained(results, name, stage):
    _needs_model_type(name)
    for rank, r in enumerate(results):
        assert r["diff"][name, stage] <= 1e-6, (rank, r["diff"][name, stage])


# mixtral, qwen2_moe: experts stacked; hrm_text: fused projections chunked (Chunk(dim=0));
# sarvam_moe: query_key_value split (Split(dim=0)) and experts stacked; olmo_hybrid: q/k/v conv
# kernels concatenated (Concatenate(dim=0))
@pytest.mark.parametrize("name", ("mixtral", "qwen2_moe", "hrm_text", "sarvam_moe", "olmo_hybrid"))
def test_each_rank_reads_only_the_sources_its_shards_cover(results, name):
    _needs_model_type(name)
    for r in results:
        read_whole, total = r["converted_bytes"][name, 0]
        assert total > 0 and read_whole == total   # stages 0-2: every expert once
        read_sharded, _ = r["converted_bytes"][name, 3]
        # world 2: measured 0.45-0.55 per rank; reading the converted sources whole gave 0.70
        # (sarvam_moe) and 1.00 (hrm_text, olmo_hybrid)
        assert read_sharded <= 0.6 * total, (read_sharded, total)


def test_clean_checkpoints_load_without_warnings(results):
    for r in results:
        for name in ("gpt2", "gpt2_no_prefix", "llama_sharded", "mixtral", "qwen2_moe", "hrm_text", "sarvam_moe",
                     "olmo_hybrid"):
            if cases.unknown_to_transformers(name):
                continue
            assert not any("LOAD REPORT" in m for m in r["warnings"][name, 3]), name


def test_extra_key_is_named_in_a_warning(results):
    for r in results:
        assert any("transformer.h.0.attn.extra_scale" in m and "UNEXPECTED" in m
                   for m in r["warnings"]["gpt2_extra_key", 3])


def test_missing_key_is_named_as_left_at_init(results):
    for r in results:
        assert any("transformer.h.1.ln_2.weight" in m and "MISSING" in m for m in r["warnings"]["gpt2_missing_key", 3])


def test_wrong_shape_is_an_error_naming_it_unless_ignored(results):
    for r in results:
        assert "transformer.h.0.ln_1.bias" in r["errors"]["wrong_shape"]
        assert "ignore_mismatched_sizes" in r["errors"]["wrong_shape"]
        assert r["ignored_equal_elsewhere"] and r["ignored_at_init"]
