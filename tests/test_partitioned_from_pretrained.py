"""transformers' own ``from_pretrained`` builds partitioned under hf_zero stage 3 (issue 14 item 1):
inside ``zero_init``, after a stage-3 ``TrainingArguments`` (the ``--deepspeed`` flag, or a stock
script under ``hf-zero launch``), after an ``Accelerator`` with ``zero3_init_flag``; 2 gloo ranks,
one spawn for the module. In-process checks of what a meta-built model must still allow."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

import hf_zero
import partitioned_load_cases as cases
from hf_zero.testing import run_on_ranks
from parity_cases import tiny_gpt2, tiny_llama

_cache: dict = {}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from zero_init_cases import llama_config

    root = tmp_path_factory.mktemp("partitioned")
    tiny_gpt2().save_pretrained(root / "gpt2")
    tiny_llama().save_pretrained(root / "llama_sharded", max_shard_size="20KB")
    from peft import LoraConfig, get_peft_model   # an adapter as training leaves it (lora_B not zero)

    get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                           init_lora_weights=False)).save_pretrained(root / "adapter")
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(root / "llama113m", max_shard_size="200MB")
    return {name: str(root / name) for name in ("gpt2", "llama_sharded", "llama113m", "adapter")}


@pytest.fixture(scope="module")
def results(dirs):
    if "all" not in _cache:
        _cache["all"] = run_on_ranks(cases.all_routes, 2, dirs, timeout_s=500)
    return _cache["all"]


def test_zero_init_from_pretrained_equals_transformers(results):
    for rank, r in enumerate(results):
        for name, (meta, diff) in r["zero_init"].items():
            assert meta, (rank, name)
            assert diff <= 1e-6, (rank, name, diff)


def test_no_rank_holds_the_whole_fp32_model_while_loading(results):
    # Each rank's fp32 shard alone is 0.5x the model at world 2; transformers' whole load is >= 1x.
    for rank, r in enumerate(results):
        psi, growth = r["rss"]["psi"], r["rss"]["growth"]
        print(f"rank {rank}: peak RSS growth {growth / 2**20:.0f} MiB = {growth / (4 * psi):.3f}x fp32")
        assert psi >= 100e6
        assert 0.5 * 4 * psi <= growth < 0.6 * 4 * psi, f"rank {rank}: {growth / (4 * psi):.3f}x of the fp32 model"


def test_trainer_deepspeed_flag_builds_partitioned_and_matches_ddp(results):
    for rank, r in enumerate(results):
        t = r["trainer"]
        assert t["flag_meta"] and t["before_args_whole"] and t["after_args_whole"], rank
        assert len(t["ddp"]) == cases.STEPS
        assert t["flag"] == pytest.approx(t["ddp"], rel=1e-5), rank


def test_stock_trainer_script_under_the_bootstrap_matches_ddp(results):
    for rank, r in enumerate(results):
        b, ddp = r["bootstrap"], r["trainer"]["ddp"]
        assert b["stock_meta"], rank
        assert b["stock"] == pytest.approx(ddp, rel=1e-5), rank


def test_accelerate_zero3_init_flag_builds_partitioned_and_matches_ddp(results):
    for rank, r in enumerate(results):
        a = r["bootstrap"]["accelerate"]
        assert a["meta"], rank
        assert a["losses"] == pytest.approx(a["expected"], rel=1e-5), rank


# ---- in this process: the switch itself and what a meta-built model still allows ----------------
def test_patch_lives_only_while_active(dirs):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"]
    with pytest.raises(ZeroDivisionError):
        with hf_zero.zero_init():
            assert PreTrainedModel.__dict__["from_pretrained"] is not original
            1 / 0
    assert PreTrainedModel.__dict__["from_pretrained"] is original
    assert not any(p.is_meta for p in AutoModelForCausalLM.from_pretrained(dirs["gpt2"]).parameters())


def test_stage3_training_arguments_switch_it_on_for_their_lifetime(tmp_path):
    from transformers import PreTrainedModel
    from transformers.integrations import is_deepspeed_zero3_enabled

    from hf_zero.partitioned_load import partitioned_loading_active

    original = PreTrainedModel.__dict__["from_pretrained"]
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args = hf_zero.ZeroTrainingArguments(hf_zero={"zero_optimization": {"stage": 2}}, **common)
    assert not partitioned_loading_active()   # stage 2 holds whole parameters: DeepSpeed builds whole too
    args = hf_zero.ZeroTrainingArguments(hf_zero={"zero_optimization": {"stage": 3}}, **common)
    assert partitioned_loading_active()
    assert not is_deepspeed_zero3_enabled()   # its other branches would import deepspeed (docs/integrations.md)
    del args
    gc.collect()
    assert not partitioned_loading_active() and PreTrainedModel.__dict__["from_pretrained"] is original


@pytest.mark.parametrize("kwargs, named", [({"device_map": "cpu"}, "device_map"),
                                           ({"quantization_config": {"load_in_8bit": True}}, "quantization_config"),
                                           ({"use_safetensors": False}, "use_safetensors"),
                                           ({"trust_remote_code": True}, "trust_remote_code")])
def test_kwargs_needing_a_whole_model_are_refused_by_name(dirs, kwargs, named):
    from transformers import AutoModelForCausalLM

    with hf_zero.zero_init(), pytest.raises(ValueError, match=named):
        AutoModelForCausalLM.from_pretrained(dirs["gpt2"], **kwargs)


def test_dtype_config_overrides_and_generation_config_as_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2LMHeadModel

    model = tiny_gpt2().to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, max_new_tokens=7, do_sample=True)
    model.save_pretrained(tmp_path)
    for cls, kwargs in ((AutoModelForCausalLM, {}), (GPT2LMHeadModel, {"dtype": torch.float16, "attn_pdrop": 0.25}),
                        (AutoModelForCausalLM, {"torch_dtype": "float32", "attn_pdrop": 0.25})):
        whole = cls.from_pretrained(tmp_path, **kwargs)
        with hf_zero.zero_init():
            meta = cls.from_pretrained(tmp_path, **kwargs)
        assert type(meta) is type(whole) and meta.dtype == whole.dtype, (cls, kwargs, meta.dtype, whole.dtype)
        assert meta.config.to_dict() == whole.config.to_dict()
        assert meta.generation_config.to_dict() == whole.generation_config.to_dict()


def test_other_heads_report_their_new_parameters(dirs, caplog):
    from transformers import AutoModelForSequenceClassification

    with hf_zero.zero_init(), caplog.at_level(logging.WARNING):
        model, info = AutoModelForSequenceClassification.from_pretrained(dirs["gpt2"], num_labels=3,
                                                                         output_loading_info=True)
    assert model.config.num_labels == 3 and model.score.weight.is_meta
    assert any("score.weight" in r.getMessage() and "MISSING" in r.getMessage() for r in caplog.records)
    _, expected = AutoModelForSequenceClassification.from_pretrained(dirs["gpt2"], num_labels=3,
                                                                     output_loading_info=True)
    assert info == expected and "score.weight" in info["missing_keys"]


def test_meta_built_model_before_initialize(dirs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with hf_zero.zero_init():
        model = AutoModelForCausalLM.from_pretrained(dirs["gpt2"])
    assert model.config.n_layer == 2
    model.gradient_checkpointing_enable()
    assert model.resize_token_embeddings().weight.shape[0] == model.config.vocab_size   # no change: allowed
    with pytest.raises(RuntimeError, match="resize_token_embeddings.*save_pretrained"):
        model.resize_token_embeddings(model.config.vocab_size + 8)
    with pytest.raises(RuntimeError, match="hf_zero.initialize"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    assert peft_model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight.is_meta


def test_hub_model_id_resolves_to_the_cached_snapshot(dirs, tmp_path, monkeypatch):
    """What scripts pass: a hub id. Offline, huggingface_hub resolves it from its cache (laid out
    here by hand: refs/main -> snapshots/<commit>), for transformers and for hf_zero alike."""
    import shutil

    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--tiny--gpt2"
    commit = "0" * 40
    shutil.copytree(dirs["gpt2"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    whole = AutoModelForCausalLM.from_pretrained("tiny/gpt2", cache_dir=str(tmp_path))
    with hf_zero.zero_init():
        model = AutoModelForCausalLM.from_pretrained("tiny/gpt2", cache_dir=str(tmp_path))
    assert model._hf_zero_weights.path == repo / "snapshots" / commit
    assert model.config.name_or_path == whole.config.name_or_path == "tiny/gpt2"


def test_zero_init_seed_initialises_the_parameters_the_checkpoint_lacks(dirs):
    from transformers import AutoModelForSequenceClassification

    def score_head(seed: int) -> torch.Tensor:
        with hf_zero.zero_init(seed=seed):
            model = AutoModelForSequenceClassification.from_pretrained(dirs["gpt2"], num_labels=3)
        engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}})
        weight = model.score.weight.detach().clone()
        engine.destroy()
        return weight

    first = score_head(5)
    assert torch.equal(first, score_head(5)) and not torch.equal(first, score_head(6))
