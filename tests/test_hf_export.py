"""After stage-3 training at world 2, model.save_pretrained (accelerate's ending) and
hf-zero consolidate write what transformers' save_pretrained writes, and it reloads to the
trained logits."""

import pytest

import export_cases as cases
import pretrained_cases
from hf_zero.testing import run_on_ranks

_cache: dict = {}
MODELS = ("gpt2", "llama_sharded", "mixtral", "qwen2_moe")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if "export" not in _cache:
        dirs = pretrained_cases.write_checkpoints(tmp_path_factory.mktemp("layouts"))
        out = tmp_path_factory.mktemp("exports")
        _cache["export"] = run_on_ranks(cases.export_after_training, 2, dirs, str(out), timeout_s=400)
    return _cache["export"]


@pytest.mark.parametrize("kind", ("save_pretrained", "consolidated"))
@pytest.mark.parametrize("name", MODELS)
def test_same_files_keys_shapes_dtypes_values_as_save_pretrained(results, name, kind):
    assert results[0][name, kind, "layout"] == []


@pytest.mark.parametrize("kind", ("save_pretrained", "consolidated"))
@pytest.mark.parametrize("name", MODELS)
def test_reloaded_by_transformers_gives_the_trained_logits(results, name, kind):
    assert results[0][name, kind, "logits"] <= 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_of_a_sharded_model_on_every_rank_gathers_the_trained_values(results, name):
    assert all(r[name, "state_dict_equal"] for r in results)


def test_lora_model_save_pretrained_under_stage_3_writes_the_trained_adapter(results):
    lora = results[0]["lora"]
    assert lora["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert lora["equal"] and lora["nonzero_b"]


def test_consolidating_a_model_loaded_by_transformers_matches_its_save_pretrained(tmp_path):
    """A MoE model loaded by transformers' own from_pretrained, then trained under hf_zero (one process)."""
    import hf_zero
    from transformers import AutoModelForCausalLM

    source = tmp_path / "mixtral"
    pretrained_cases.tiny_mixtral().save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    model.save_pretrained(tmp_path / "reference", max_shard_size=cases.SHARD)
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
                                        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    engine.save_checkpoint(tmp_path / "ckpt")
    hf_zero.consolidate(tmp_path / "ckpt", tmp_path / "consolidated", max_shard_size=cases.SHARD)
    assert cases._compare(tmp_path / "consolidated", tmp_path / "reference") == []
