"""Stage 3 at world 2: model.state_dict() (and a submodule's, and peft's adapter state dict) on
every rank equals the unsharded model's; model.save_pretrained, engine.save_16bit_model and
accelerate's get_state_dict / save_model gather on every rank; each of them called on rank 0
alone raises there within the presence timeout, naming rank 1, and the next all-rank call works.
accelerate's save_model (and save_pretrained(state_dict=get_state_dict(model))) of a transformers
model writes save_pretrained's layout."""

import pytest

import state_dict_cases as cases
from hf_zero.testing import run_on_ranks

_cache: dict = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if "run" not in _cache:
        _cache["run"] = run_on_ranks(cases.state_dicts, 2, str(tmp_path_factory.mktemp("saves")), timeout_s=300)
    return _cache["run"]


def _raised_in_time(lone: dict, call: str) -> None:
    assert lone["error"] is not None, f"{call} on rank 0 alone did not raise"
    assert call in lone["error"] and "rank(s) [1]" in lone["error"], lone["error"]
    assert "every rank" in lone["error"] and "GatheredParameters" in lone["error"]
    assert lone["seconds"] < cases.TIMEOUT_S + 10


@pytest.mark.parametrize("name", ("gpt2", "llama"))
def test_state_dict_on_every_rank_equals_the_unsharded_models(results, name):
    for r in results:
        assert r[name, "all_ranks"] == []
        assert r[name, "sharded_after"]   # released again
        assert r[name, "most_gathered_groups"] == 1   # one group (unit) at a time
        assert r[name, "tied_shared"] in ((True,) if name == "gpt2" else (None,))


@pytest.mark.parametrize("name", ("gpt2", "llama"))
def test_state_dict_of_a_submodule_equals_the_unsharded_submodules(results, name):
    assert all(r[name, "submodule"] == [] and r[name, "prefixed"] == [] for r in results)


@pytest.mark.parametrize("name", ("gpt2", "llama"))
def test_state_dict_on_rank_0_alone_raises_naming_rank_1_then_all_ranks_still_works(results, name):
    _raised_in_time(results[0][name, "lone"], "model.state_dict()")
    assert all(r[name, "then_all_ranks"] == [] for r in results)


def test_state_dict_keeps_the_dtype_the_module_holds(results):
    assert all(r["bf16"] == [] for r in results)


def test_state_dict_of_parameters_offloaded_to_nvme_equals_the_unsharded_models(results):
    assert all(r["offload_param_nvme"] == [] for r in results)


def test_peft_adapter_state_dict_equals_the_unsharded_peft_models(results):
    assert all(r["peft"] == [] for r in results)


def test_save_pretrained_and_save_16bit_model_alone_raise_and_on_every_rank_reload_to_the_trained_logits(results):
    out = results[0]["save_pretrained"]
    _raised_in_time(out["lone"], "model.save_pretrained()")
    _raised_in_time(out["lone_16bit"], "engine.save_16bit_model()")
    assert not out["lone_wrote"]
    assert out["logits"] <= 1e-6


def test_accelerate_get_state_dict_and_save_model_gather_on_every_rank(results):
    assert all(r["accelerate"]["get_state_dict"] == [] for r in results)
    assert all(r["accelerate"]["save_state_gathers"] == 0 for r in results)
    out = results[0]["accelerate"]
    _raised_in_time(out["lone"], "accelerator.get_state_dict(model)")
    assert out["files"] > 1 and out["written"] == []   # sharded by max_shard_size, every value as gathered
    assert out["logits"] <= 1e-6


@pytest.mark.parametrize("kind", ("save_model", "idiom"))
@pytest.mark.parametrize("name", ("gpt2", "mixtral"))
def test_accelerate_save_model_and_save_pretrained_of_get_state_dict_write_save_pretrained_layout(results, name,
                                                                                                  kind):
    """Same files, index, keys, shapes, dtypes and values as transformers' save_pretrained of the
    gathered weights (tied head dropped, per-expert MoE keys); reloads to the trained logits."""
    out = results[0]["accelerate_layout", name]
    assert out[kind, "keys"] == []
    assert out[kind, "shapes_dtypes"] == []
    assert out[kind, "layout"] == []
    assert out[kind, "logits"] <= 1e-6
