"""Config: DeepSpeed key names, validation errors naming the dotted key, batch invariant."""

import json
import warnings

import pytest
import torch

import hf_zero
from hf_zero.config import ConfigError, load_config, resolve_batch_sizes

# The ZeRO-2 config from the transformers DeepSpeed docs, as users have it on disk.
HF_DOCS_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def problems(config) -> dict:
    with pytest.raises(ConfigError) as info:
        load_config(config)
    return dict(info.value.problems)


def test_deepspeed_docs_config_loads_unchanged(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(HF_DOCS_ZERO2))
    config = load_config(str(path))
    assert config.zero_optimization.stage == 2
    assert config.zero_optimization.reduce_bucket_size == 200_000_000
    assert config.optimizer.params.lr == "auto" and config.fp16.enabled == "auto"
    assert config.zero_optimization.offload_optimizer.device == "cpu"


def test_defaults_and_inline_json():
    config = load_config('{"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": true}}')
    assert config.bf16.enabled is True and config.fp16.enabled is False
    assert config.gradient_clipping == 1.0  # DeepSpeed 0.19's default
    assert config.zero_optimization.stage == 0


def test_unknown_key_suggests_the_right_one():
    found = problems({"zero_optimization": {"stgae": 2}, "gradient_cliping": 1.0})
    assert "did you mean 'zero_optimization.stage'" in found["zero_optimization.stgae"]
    assert "did you mean 'gradient_clipping'" in found["gradient_cliping"]


@pytest.mark.parametrize("config, key, fragment", [
    ({"zero_optimization": {"stage": "two"}}, "zero_optimization.stage", "expected an integer"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage", "<= 3"),
    ({"zero_optimization": {"reduce_bucket_size": 1.5}}, "zero_optimization.reduce_bucket_size", "integer"),
    ({"fp16": {"enabled": 1}}, "fp16.enabled", "true/false"),
    ({"fp16": {"hysteresis": 0}}, "fp16.hysteresis", ">= 1"),
    ({"gradient_clipping": -1}, "gradient_clipping", ">= 0"),
    ({"optimizer": {"type": "AdamWW"}}, "optimizer.type", "did you mean 'AdamW'"),
    ({"optimizer": {"params": {"betas": [0.9]}}}, "optimizer.params.betas", "pair of numbers"),
    ({"scheduler": {"type": "OneCycle"}}, "scheduler.type", "must be one of"),
    ({"zero_optimization": {"stage3_max_live_parameters": "auto"}}, "zero_optimization.stage3_max_live_parameters",
     "'auto' is not allowed"),
    ({"zero_optimization": 2}, "zero_optimization", "expected an object"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1},
     "train_batch_size", "not a multiple"),
])
def test_bad_values_name_the_key(config, key, fragment):
    found = problems(config)
    assert key in found and fragment in found[key], found


def test_all_problems_reported_together():
    found = problems({"fp16": {"enabled": "yes"}, "steps_per_print": 0, "bogus": 1})
    assert set(found) == {"fp16.enabled", "steps_per_print", "bogus"}


def test_ignored_deepspeed_keys_warn_not_fail():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config({"prescale_gradients": False, "tensorboard": {"enabled": True}})
    assert any("prescale_gradients" in str(w.message) for w in caught)


@pytest.mark.parametrize("given, world, expected", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
    ({"train_micro_batch_size_per_gpu": 4}, 3, (12, 4, 1)),
    ({"train_batch_size": 12}, 3, (12, 4, 1)),
])
def test_batch_invariant_derives_the_missing_key(given, world, expected):
    config = resolve_batch_sizes(load_config(given), world)
    got = (config.train_batch_size, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps)
    assert got == expected


@pytest.mark.parametrize("given, world, key", [
    ({}, 1, "train_micro_batch_size_per_gpu"),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 2, "train_batch_size"),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}, 2,
     "train_batch_size"),
    ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4}, 1, "train_batch_size"),
])
def test_batch_invariant_violations(given, world, key):
    with pytest.raises(ConfigError) as info:
        resolve_batch_sizes(load_config(given), world)
    assert key in dict(info.value.problems)


def test_initialize_rejects_before_touching_the_model():
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    with pytest.raises(ConfigError, match="gradient_clipping"):
        hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": "auto"})
    with pytest.raises(ConfigError, match="offload"):
        hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1,
                                   "zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    assert model.weight.data_ptr() == before.data_ptr() or torch.equal(model.weight, before)
    assert "no_sync" not in model.__dict__


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_config(str(tmp_path / "nope.json"))


def test_broken_json_is_a_config_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="c.json"):
        load_config(str(path))


def test_docs_list_every_key():
    from hf_zero.config.docgen import render

    with open("docs/config.md") as f:
        assert f.read() == render(), "docs/config.md is stale: run python -m hf_zero.config.docgen"
