"""Issue 17 without launching anything: the ``--deepspeed`` flag, DeepSpeed launcher spellings,
accelerate DeepSpeed yaml translation and the CPU set-up of ``hf-zero launch``. The runs
themselves are in integration_tests/test_deepspeed_dropin.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from hf_zero.integrations import launch as launch_module
from hf_zero.integrations.accelerate_config import split_accelerate_yaml
from hf_zero.integrations.bootstrap import resolve_config
from hf_zero.integrations.common import take_deepspeed_flag


@pytest.mark.parametrize("argv, rest, value", [
    (["--lr", "1", "--deepspeed", "ds.json", "--x"], ["--lr", "1", "--x"], "ds.json"),
    (["--deepspeed={\"a\": 1}", "--y"], ["--y"], '{"a": 1}'),
    (["--deepspeed_config", "c.json"], ["--deepspeed_config", "c.json"], None),   # another flag, kept
    (["--deepspeed", "a.json", "--deepspeed=a.json"], [], "a.json"),
])
def test_take_deepspeed_flag(argv, rest, value):
    assert take_deepspeed_flag(argv) == (rest, value)


def test_take_deepspeed_flag_refuses_ambiguity():
    with pytest.raises(ValueError, match="twice"):
        take_deepspeed_flag(["--deepspeed", "a.json", "--deepspeed", "b.json"])
    with pytest.raises(ValueError, match="needs a value"):
        take_deepspeed_flag(["--deepspeed"])


def test_bootstrap_takes_the_flag_out_and_uses_it(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ZERO_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text("{}")
    config, args = resolve_config(None, ["--output_dir", "o", "--deepspeed", "ds.json"])
    assert config == str(tmp_path / "ds.json") and args == ["--output_dir", "o"]
    monkeypatch.setenv("HF_ZERO_CONFIG", '{"zero_optimization": {"stage": 1}}')   # the launcher's value wins
    config, args = resolve_config(None, ["--deepspeed", "ds.json"])
    assert config == '{"zero_optimization": {"stage": 1}}' and args == []


def test_zero_training_arguments_take_deepspeed_without_importing_it(tmp_path):
    from transformers import HfArgumentParser

    from hf_zero import ZeroTrainingArguments

    config = json.dumps({"zero_optimization": {"stage": 3}})
    args, = HfArgumentParser(ZeroTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--deepspeed", config])
    assert args.deepspeed is None and args.hf_zero == {"zero_optimization": {"stage": 3}}
    assert "deepspeed" not in sys.modules   # transformers would import (and here fail to find) it
    with pytest.raises(ValueError, match="both set"):
        ZeroTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", deepspeed="a.json",
                              hf_zero="b.json")


def _yaml(tmp_path: Path, deepspeed_config: dict, **top) -> tuple[Path, dict]:
    data = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_machines": 1,
            "num_processes": 2, "mixed_precision": "no", "deepspeed_config": deepspeed_config, **top}
    path = tmp_path / "acc_ds.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def test_accelerate_deepspeed_yaml_keys_map_as_accelerate_maps_them(tmp_path):
    path, data = _yaml(tmp_path, {"zero_stage": 3, "offload_optimizer_device": "cpu", "offload_param_device": "nvme",
                                  "offload_param_nvme_path": "/nvme", "gradient_accumulation_steps": 4,
                                  "gradient_clipping": 0.5, "zero3_save_16bit_model": True,
                                  "deepspeed_multinode_launcher": "standard"})
    accelerate_part, config, env = split_accelerate_yaml(path, data)
    assert config == {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                      "gradient_accumulation_steps": "auto", "gradient_clipping": 0.5,
                      "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                            "offload_param": {"device": "nvme", "nvme_path": "/nvme"},
                                            "stage3_gather_16bit_weights_on_model_save": True}}
    assert env == {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}
    assert accelerate_part["distributed_type"] == "MULTI_GPU" and "deepspeed_config" not in accelerate_part


def test_accelerate_deepspeed_yaml_defaults(tmp_path):
    """accelerate's defaults: stage 2, no offload, gradient_clipping 1.0 (filled in _prepare_deepspeed)."""
    path, data = _yaml(tmp_path, {}, num_processes=1)
    accelerate_part, config, env = split_accelerate_yaml(path, data)
    assert config["zero_optimization"] == {"stage": 2} and config["gradient_clipping"] == 1.0 and env == {}
    assert accelerate_part["distributed_type"] == "NO"


def test_accelerate_deepspeed_yaml_with_a_config_file(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": "auto",
                                                  "train_micro_batch_size_per_gpu": "auto"}))
    path, data = _yaml(tmp_path, {"deepspeed_config_file": "ds.json", "zero3_init_flag": False})
    _, config, _ = split_accelerate_yaml(path, data)   # relative to the yaml's folder
    assert config["zero_optimization"] == {"stage": 1} and config["gradient_accumulation_steps"] == "auto"
    path, data = _yaml(tmp_path, {"deepspeed_config_file": "ds.json", "zero_stage": 2})
    with pytest.raises(ValueError, match="deepspeed_config.zero_stage is set together with deepspeed_config_file"):
        split_accelerate_yaml(path, data)


@pytest.mark.parametrize("deepspeed_config, top, message", [
    ({"zero_stagee": 2}, {}, "deepspeed_config.zero_stagee is not a key accelerate knows"),
])
def test_accelerate_deepspeed_yaml_refusals(tmp_path, deepspeed_config, top, message):
    path, data = _yaml(tmp_path, deepspeed_config, **top)
    with pytest.raises(ValueError, match=message):
        split_accelerate_yaml(path, data)


def test_zero3_init_flag_reaches_the_ranks_as_accelerate_passes_it(tmp_path):
    """true: accelerate's own variable for the ranks (partitioned from_pretrained after the
    Accelerator exists, tests/test_partitioned_from_pretrained.py); false or absent: nothing."""
    path, data = _yaml(tmp_path, {"zero_stage": 3, "zero3_init_flag": True})
    assert split_accelerate_yaml(path, data)[2] == {"ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}
    _, env = launch_module.build_command(str(path), 2, "t.py", [], str(tmp_path))   # every rank's environment
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    for flag in ({"zero3_init_flag": False}, {}):
        path, data = _yaml(tmp_path, {"zero_stage": 3, **flag})
        assert split_accelerate_yaml(path, data)[2] == {}


def test_json_config_sets_up_multi_process_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_module, "_cuda_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    command, env = launch_module.build_command('{"zero_optimization": {"stage": 2}}', 2, "t.py", [], str(tmp_path))
    assert env["ACCELERATE_USE_CPU"] == "true" and "ACCELERATE_USE_DEEPSPEED" not in env
    monkeypatch.setattr(launch_module, "_cuda_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    command, env = launch_module.build_command('{"zero_optimization": {"stage": 2}}', 2, "t.py", [], str(tmp_path))
    assert "ACCELERATE_USE_CPU" not in env


def test_cli_deepspeed_launcher_spellings(tmp_path, capsys):
    from hf_zero.cli import main

    script = tmp_path / "train.py"
    script.write_text("")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    # the DeepSpeed user's command line: --num_gpus, the config only in the script's own --deepspeed
    assert main(["launch", "--dry-run", "--num_gpus", "2", str(script), "--deepspeed", str(ds), "--lr", "1"]) == 0
    out = capsys.readouterr().out
    assert f"HF_ZERO_CONFIG={ds.resolve()}" in out and "--nproc_per_node 2" in out
    assert main(["launch", "--dry-run", "--hostfile", "hosts", str(script), "--deepspeed", str(ds)]) == 2
    assert "--hostfile (a `deepspeed` launcher option) is not supported" in capsys.readouterr().err
    assert main(["launch", "--dry-run", str(script)]) == 2
    assert "no config" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text("{}")
    assert main(["launch", "--dry-run", "--config", str(other), str(script), "--deepspeed", str(ds)]) == 2
    assert "differ" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [2, 3])
def test_stage3_models_default_generate_to_synced(stage):
    """transformers defaults generate(synced_gpus=...) from is_fsdp_managed_module; the stage-3
    model answers True (the parameters are sharded), stage 2 False (whole on every rank)."""
    import torch
    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.integrations import is_deepspeed_zero3_enabled

    import hf_zero

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1}
    hf_zero.prepare_accelerate(Accelerator(cpu=True), model, optimizer, config=config)
    assert is_fsdp_managed_module(model) == (stage == 3)
    assert not is_deepspeed_zero3_enabled()   # its other branches would import deepspeed
