"""Real DeepSpeed configs from public repositories (tests/data/ds_configs/, sources in SOURCES.md):
each loads; each key hf_zero does not honour is reported by name, once; keys that change
numerics or memory are refused unless ``allow_unhonoured_keys``; ``hf-zero check-config``
lists them. Three of them train through the HF Trainer at world 2 in test_optimizers.py."""

import json
import warnings
from pathlib import Path

import pytest

from hf_zero.cli import main as cli
from hf_zero.config import ConfigError, load_config
from hf_zero.config.parse import unhonoured_keys

CORPUS = Path(__file__).parent / "data" / "ds_configs"
REUSE = "zero_optimization.stage3_max_reuse_distance"
# file -> (keys warned about, of which those refused without allow_unhonoured_keys)
EXPECTED = {
    "transformers_zero2.json": (set(), set()),
    "transformers_zero3.json": ({REUSE}, set()),
    "transformers_zero2_bf16.json": (set(), set()),
    "transformers_zero3_bf16.json": ({REUSE}, set()),
    "accelerate_zero_stage1.json": (set(), set()),
    "accelerate_zero_stage2_offload.json": (set(), set()),
    "accelerate_zero_stage3.json": ({REUSE}, set()),
    "accelerate_zero_stage3_offload.json": ({REUSE}, set()),
    "accelerate_tests_zero3.json": ({REUSE}, set()),
    "dsexamples_gpt2_baseline.json": (set(), set()),
    "dsexamples_bert_large_onebitlamb.json": ({"optimizer.type"}, {"optimizer.type"}),
    "dsexamples_llama_13b_zero3_offload.json": ({REUSE}, set()),
    "llamafactory_ds_z3_offload.json": ({REUSE, "zero_allow_untested_optimizer", "comms_config", "monitor_config"},
                                        set()),
    "axolotl_zero3_bf16_cpuoffload_all.json": ({REUSE, "zero_allow_untested_optimizer",
                                                "zero_force_ds_cpu_optimizer"}, set()),
    "deepspeed_docs_zero_infinity_nvme.json": ({"aio"}, set()),
    "deepspeed_docs_partial_offload.json": (set(), set()),   # ratio honoured (docs/offload.md)
    "deepspeed_moe_tutorial_fp16_master.json": ({"fp16.fp16_master_weights_and_grads"},
                                                {"fp16.fp16_master_weights_and_grads"}),
    "deepspeed_docs_lamb.json": (set(), set()),
}


def test_the_corpus_is_the_expected_one():
    assert len(EXPECTED) >= 12
    assert {p.name for p in CORPUS.glob("*.json")} == set(EXPECTED)
    sources = (CORPUS / "SOURCES.md").read_text()
    assert all(f"| {name} |" in sources for name in EXPECTED), "every file names its source"


def _load(config, **overrides):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(str(config) if isinstance(config, Path) else config, **overrides)
    return config, [str(w.message) for w in caught if "does not honour" in str(w.message)]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_validates_and_reports_exactly_its_unhonoured_keys(name):
    warned, refused = EXPECTED[name]
    path = CORPUS / name
    assert {n.key for n in unhonoured_keys(str(path))} == warned
    assert {n.key for n in unhonoured_keys(str(path)) if n.severe} == refused
    if refused:
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert {key for key, _ in info.value.problems} == refused
        assert all("allow_unhonoured_keys" in message for _, message in info.value.problems)
    config, messages = _load(path, allow_unhonoured_keys=True) if refused else _load(path)
    assert len(messages) == len(warned), messages   # one warning per key
    assert {m.split("'")[1] for m in messages} == warned


def test_aliases_and_deepspeed_spellings_take_effect():
    zero3 = load_config(str(CORPUS / "transformers_zero3.json"))
    assert zero3.zero_optimization.reduce_bucket_size == 0
    assert zero3.zero_optimization.stage3_gather_16bit_weights_on_model_save is True
    bf16 = load_config(str(CORPUS / "transformers_zero3_bf16.json"))
    assert bf16.bf16.enabled == "auto"
    assert load_config(str(CORPUS / "accelerate_zero_stage3.json")).zero_optimization.\
        stage3_gather_16bit_weights_on_model_save == "auto"
    axolotl = load_config(str(CORPUS / "axolotl_zero3_bf16_cpuoffload_all.json")).zero_optimization
    assert (axolotl.sub_group_size, axolotl.stage3_max_live_parameters) == (0, 0)
    infinity = load_config(str(CORPUS / "deepspeed_docs_zero_infinity_nvme.json")).zero_optimization
    assert infinity.offload_optimizer.pipeline_read and infinity.offload_optimizer.pipeline_write
    moe = load_config(str(CORPUS / "deepspeed_moe_tutorial_fp16_master.json"), allow_unhonoured_keys=True)
    assert moe.zero_optimization.offload_optimizer.device == "cpu"   # cpu_offload: true
    lamb = load_config(str(CORPUS / "deepspeed_docs_lamb.json")).optimizer
    assert (lamb.type, lamb.params.bias_correction, lamb.params.max_coeff) == ("Lamb", False, 0.3)


@pytest.mark.parametrize("config, key, fragment", [
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "bf16.enabled", "fp16.enabled and bf16.enabled"),
    ({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, "bfloat16", "keep one"),
    ({"optimizer": {"type": "Lion", "params": {"eps": 1e-8}}}, "optimizer.params.eps", "not a parameter of"),
    ({"optimizer": {"type": "Lamb", "params": {"max_grad_norm": 1.0}}}, "optimizer.params.max_grad_norm",
     "allow_unhonoured_keys"),
    ({"zero_optimization": {"reduce_scatter": False, "offload_optimizer": {"ratio": 1.5}}},
     "zero_optimization.offload_optimizer.ratio", "must be <= 1.0"),
    ({"bf16": {"enabled": True, "bf16_optimizer_states": True}}, "bf16.bf16_optimizer_states", "fp32"),
    ({"communication_data_type": "bf16"}, "communication_data_type", "allow_unhonoured_keys"),
])
def test_refusals_name_the_key(config, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(config)
    problems = dict(info.value.problems)
    assert key in problems and fragment in problems[key], problems


def test_non_numeric_keys_only_warn():
    _, messages = _load({"zero_optimization": {"reduce_scatter": False, "stage3_max_reuse_distance": 0,
                                               "offload_optimizer": {"pipeline_read": False}}})
    keys = {m.split("'")[1] for m in messages}
    assert keys == {"zero_optimization.reduce_scatter", "zero_optimization.stage3_max_reuse_distance",
                    "zero_optimization.offload_optimizer.pipeline_read"}


def test_check_config_lists_unhonoured_keys(capsys):
    assert cli(["check-config", str(CORPUS / "llamafactory_ds_z3_offload.json")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["zero_optimization"]["stage"] == 3
    assert "4 DeepSpeed key(s)" in err and "comms_config" in err and REUSE in err
    assert cli(["check-config", str(CORPUS / "deepspeed_moe_tutorial_fp16_master.json")]) == 2
    assert "fp16.fp16_master_weights_and_grads" in capsys.readouterr().err
    assert cli(["check-config", str(CORPUS / "deepspeed_docs_partial_offload.json")]) == 0   # ratio is honoured
    assert "offload_optimizer.ratio" not in capsys.readouterr().err


def _schema_paths(cls=None, prefix="") -> set[str]:
    import dataclasses
    import typing

    from hf_zero.config.schema import HfZeroConfig

    cls = cls or HfZeroConfig
    paths = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        paths.add(prefix + f.name)
        nested = [a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(a)]
        if nested:
            paths |= _schema_paths(nested[0], f"{prefix}{f.name}.")
    return paths


def _doc_key_mentions() -> list[tuple[str, str]]:
    """(file, token) for every backticked token in docs/ that reads as a config key: a dotted
    path starting at a config section, or a DeepSpeed-style leaf (stage3_*, *_bucket_size)."""
    import re

    sections = {"zero_optimization", "offload_optimizer", "offload_param", "fp16", "bf16", "bfloat16"}
    found = []
    for path in sorted((Path(__file__).parents[1] / "docs").glob("*.md")):
        for token in re.findall(r"`([^`\n]+)`", path.read_text()):
            key = token.split(":")[0].split("=")[0].strip().strip('"')
            if not re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)*", key):
                continue
            parts = key.split(".")
            dotted = len(parts) > 1 and (parts[0] in sections or (parts[0] in ("optimizer", "scheduler")
                                                                  and parts[1] in ("type", "params")))
            leaf = len(parts) == 1 and (key.startswith("stage3_") or key.endswith("_bucket_size"))
            if dotted or leaf:
                found.append((path.name, key))
        for block in re.findall(r"```json\n(.*?)```", path.read_text(), re.S):   # config examples: every key
            found += [(path.name, key) for key in _json_key_paths(json.loads(block))]
    return found


def _json_key_paths(data: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in data.items():
        paths.append(prefix + key)
        if isinstance(value, dict):
            paths += _json_key_paths(value, f"{prefix}{key}.")
    return paths


def test_every_config_key_mentioned_in_docs_exists():
    from hf_zero.config.compat import DTYPE_KEYS, RULES, STAGE3_SHORT_NAMES
    from hf_zero.config.schema import IGNORED_DEEPSPEED_KEYS

    known = _schema_paths() | set(IGNORED_DEEPSPEED_KEYS) | {rule[0] for rule in RULES} | set(DTYPE_KEYS)
    known |= {"bfloat16", "bfloat16.enabled", "zero_optimization.stage3_gather_fp16_weights_on_model_save",
              "zero_optimization.cpu_offload"} | {f"zero_optimization.{k}" for k in STAGE3_SHORT_NAMES}
    mentions = _doc_key_mentions()
    assert len(mentions) > 50, "the scan found too few keys to mean anything"
    unknown = [(doc, key) for doc, key in mentions
               if key not in known and not any(k.endswith("." + key) for k in known)]
    assert not unknown, f"config keys in docs/ that the schema does not know: {unknown}"


def test_accelerates_auto_keys_load_and_initialize_names_them_if_unresolved():
    import torch

    import hf_zero

    config = {"train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "auto", "nvme_path": "auto"},
                                    "offload_param": {"device": "auto"}}}
    assert load_config(config).zero_optimization.stage == "auto"
    with pytest.raises(ConfigError) as info:
        hf_zero.initialize(torch.nn.Linear(2, 2), config)
    assert {key for key, _ in info.value.problems} == {
        "zero_optimization.stage", "zero_optimization.offload_optimizer.device",
        "zero_optimization.offload_optimizer.nvme_path", "zero_optimization.offload_param.device"}


def test_trainer_values_fill_only_parameters_the_optimizer_type_takes():
    from hf_zero.integrations.auto_values import resolve_auto

    trainer = {"optimizer.params.lr": 1e-3, "optimizer.params.betas": (0.9, 0.999), "optimizer.params.eps": 1e-8,
               "optimizer.params.weight_decay": 0.0}
    lion = resolve_auto({"optimizer": {"type": "lion", "params": {"lr": "auto"}}, "train_micro_batch_size_per_gpu": 1},
                        trainer, {}, "TrainingArguments").optimizer
    assert (lion.type, lion.params.lr, lion.params.betas, lion.params.eps) == ("Lion", 1e-3, None, None)
    adamw = resolve_auto({"optimizer": {"type": "AdamW"}, "train_micro_batch_size_per_gpu": 1}, trainer, {},
                         "TrainingArguments").optimizer
    assert (adamw.params.betas, adamw.params.eps) == ((0.9, 0.999), 1e-8)


def test_legacy_offload_switches_and_enabled_features():
    zero = load_config({"zero_optimization": {"stage": 3, "cpu_offload": True, "cpu_offload_param": True,
                                              "cpu_offload_use_pin_memory": False}}).zero_optimization
    assert (zero.offload_optimizer.device, zero.offload_param.device) == ("cpu", "cpu")
    assert not zero.offload_optimizer.pin_memory and not zero.offload_param.pin_memory
    _, messages = _load({"curriculum_learning": {"enabled": False}, "eigenvalue": {"enabled": True}})
    assert {m.split("'")[1] for m in messages} == {"curriculum_learning", "eigenvalue"}
    with pytest.raises(ConfigError, match="curriculum_learning: not honoured by hf_zero: the curriculum"):
        load_config({"curriculum_learning": {"enabled": True}})


def test_a_loaded_config_with_overrides_is_not_reported_again():
    config, messages = _load(CORPUS / "transformers_zero3.json")
    assert messages
    _, again = _load(config, gradient_clipping=0.5)
    assert again == []


@pytest.mark.parametrize("config, refused", [
    ({"bf16": {"enabled": True}, "communication_data_type": "bf16", "data_types": {"grad_accum_dtype": "bf16"}},
     set()),
    ({"data_types": {"grad_accum_dtype": "fp32"}}, set()),
    ({"bf16": {"enabled": True}, "communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}},
     {"communication_data_type", "data_types.grad_accum_dtype"}),
])
def test_dtype_keys_are_honoured_when_they_name_the_training_dtype(config, refused):
    assert {n.key for n in unhonoured_keys(config)} == refused
    assert {n.key for n in unhonoured_keys(config) if n.severe} == refused
