"""Integration adapters without launching processes: auto resolution, the --hf_zero flag,
`hf-zero launch` command construction and its input checks, lazy imports."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import hf_zero
from hf_zero.config import ConfigError
from hf_zero.integrations.auto_values import derived_from_hidden_size, hidden_size_of, resolve_auto
from hf_zero.integrations.launch import build_command, split_config


def training_args(**overrides):
    from transformers import TrainingArguments

    values = dict(output_dir="unused", per_device_train_batch_size=3, gradient_accumulation_steps=2,
                  learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.1,
                  max_grad_norm=0.5, warmup_steps=5, use_cpu=True, report_to="none")
    values.update(overrides)
    return TrainingArguments(**values)


def test_import_hf_zero_does_not_import_transformers_or_accelerate():
    code = "import sys, hf_zero; print(sorted(m for m in ('transformers', 'accelerate', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_auto_values_filled_from_training_arguments():
    from hf_zero.integrations.trainer import trainer_values

    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                         "weight_decay": "auto"}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                                "warmup_num_steps": "auto", "total_num_steps": "auto"}},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                    "stage3_param_persistence_threshold": "auto"}}
    matched, derived = trainer_values(training_args(), max_steps=40)
    derived.update(derived_from_hidden_size(64))
    resolved = resolve_auto(config, matched, derived, "TrainingArguments")
    world = training_args().world_size
    assert (resolved.train_micro_batch_size_per_gpu, resolved.gradient_accumulation_steps) == (3, 2)
    assert resolved.train_batch_size == 6 * world
    assert resolved.gradient_clipping == 0.5
    assert resolved.fp16.enabled is False and resolved.bf16.enabled is False
    params = resolved.optimizer.params
    assert (params.lr, params.betas, params.eps, params.weight_decay) == (3e-4, (0.8, 0.95), 1e-7, 0.1)
    sched = resolved.scheduler.params
    assert (sched.warmup_min_lr, sched.warmup_max_lr, sched.warmup_num_steps, sched.total_num_steps) == (
        0.0, 3e-4, 5, 40)
    zero = resolved.zero_optimization
    assert zero.reduce_bucket_size == 64 * 64
    assert zero.stage3_prefetch_bucket_size == int(0.9 * 64 * 64)
    assert zero.stage3_param_persistence_threshold == 640


def test_absent_keys_take_the_trainers_values_and_sections_stay_optional():
    from hf_zero.integrations.trainer import trainer_values

    matched, derived = trainer_values(training_args(), max_steps=10)
    resolved = resolve_auto({"zero_optimization": {"stage": 1}}, matched, derived, "TrainingArguments")
    assert resolved.gradient_accumulation_steps == 2 and resolved.gradient_clipping == 0.5
    assert resolved.optimizer is None and resolved.scheduler is None   # the Trainer's own are used


def test_contradictions_are_reported_together():
    from hf_zero.integrations.trainer import trainer_values

    matched, derived = trainer_values(training_args(), max_steps=10)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
              "optimizer": {"params": {"lr": 0.1, "betas": [0.8, 0.95]}}, "bf16": {"enabled": True}}
    with pytest.raises(ConfigError) as err:
        resolve_auto(config, matched, derived, "TrainingArguments")
    keys = {key for key, _ in err.value.problems}
    assert keys >= {"train_micro_batch_size_per_gpu", "gradient_clipping", "optimizer.params.lr", "bf16.enabled"}
    assert "optimizer.params.betas" not in keys   # equal values are no contradiction
    assert "TrainingArguments says 3" in str(err.value)


def test_auto_without_a_source_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size"):
        resolve_auto({"zero_optimization": {"reduce_bucket_size": "auto"}}, {}, {}, "the Accelerator")


def test_hidden_size_of_models_and_peft_models():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=48, n_head=2, vocab_size=64, n_positions=8))
    assert hidden_size_of(model) == 48
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert hidden_size_of(peft_model) == 48
    assert derived_from_hidden_size(None) == {}


def test_hf_zero_flag_parses_inline_json_and_paths(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(hf_zero.ZeroTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--use_cpu", "--hf_zero",
                                                  '{"zero_optimization": {"stage": 2}}'])
    assert args.hf_zero == {"zero_optimization": {"stage": 2}}
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--use_cpu", "--hf_zero", "z.json"])
    assert args.hf_zero == "z.json"
    assert pickle.loads(pickle.dumps(args)).hf_zero == "z.json"   # training_args.bin is torch.save(args)


def test_trainer_refuses_a_bad_config_at_construction(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    bad = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stag": 2}}
    args = hf_zero.ZeroTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                         per_device_train_batch_size=2, hf_zero=bad)
    with pytest.raises(ConfigError) as err:
        hf_zero.HfZeroTrainer(model=model, args=args)
    # the contradiction with --per_device_train_batch_size and the typo, in one error
    assert {key for key, _ in err.value.problems} >= {"zero_optimization.stag", "train_micro_batch_size_per_gpu"}


def test_launch_command_uses_torchrun_and_passes_the_config(tmp_path):
    config = tmp_path / "z.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    command, env = build_command(str(config), 2, "train.py", ["--lr", "1"], str(tmp_path))
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[command.index("--nproc_per_node") + 1] == "2"
    assert command[-4:] == ["hf_zero.integrations.bootstrap", "train.py", "--lr", "1"]
    assert env["HF_ZERO_CONFIG"] == str(config.resolve())


def test_launch_splits_an_accelerate_yaml(tmp_path):
    yaml_file = tmp_path / "acc.yaml"
    yaml_file.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n"
                         "hf-zero:\n  zero_optimization: {stage: 2}\n")
    accelerate_part, value, _ = split_config(str(yaml_file))
    assert "hf-zero" not in accelerate_part and json.loads(value) == {"zero_optimization": {"stage": 2}}
    command, env = build_command(str(yaml_file), None, "train.py", [], str(tmp_path))
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    import yaml

    written = yaml.safe_load(Path(command[command.index("--config_file") + 1]).read_text())
    # accelerate starts several CPU processes only through mpirun: its torchrun launcher on CPU instead
    assert written["distributed_type"] == "MULTI_GPU" and env["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.parametrize("text, message", [
    ("distributed_type: MULTI_CPU\nnum_processes: 2\n", "without an 'hf-zero:' section"),
    ("distributed_type: MULTI_CPU\nhf-zero:\n  zero_optimization: {stage: 7}\n", "zero_optimization.stage"),
])
def test_launch_refuses_bad_configs_before_starting(tmp_path, text, message):
    yaml_file = tmp_path / "acc.yaml"
    yaml_file.write_text(text)
    with pytest.raises(ValueError, match=message):
        split_config(str(yaml_file))


def test_cli_launch_reports_a_bad_key_with_exit_code_2(tmp_path, capsys):
    from hf_zero.cli import main

    script = tmp_path / "train.py"
    script.write_text("")
    assert main(["launch", "--config", '{"zero_optimisation": {}}', str(script)]) == 2
    assert "did you mean 'zero_optimization'" in capsys.readouterr().err
    assert main(["launch", "--config", '{}', str(tmp_path / "missing.py")]) == 2


def test_trainer_fp16_is_owned_by_hf_zero(tmp_path):
    """One process, in-process: fp16 "auto" follows --fp16, the accelerator's own mixed
    precision is off (no GradScaler), hf_zero's loss scale reaches backward, steps train."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.arange(i, i + 8) % 32
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8,
                                       bos_token_id=0, eos_token_id=0))
    config = {"fp16": {"enabled": "auto", "initial_scale_power": 8}, "zero_optimization": {"stage": 2},
              "wall_clock_breakdown": True, "steps_per_print": 1}
    args = hf_zero.ZeroTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", fp16=True,
                                         per_device_train_batch_size=2, max_steps=3, logging_steps=1,
                                         save_strategy="no", disable_tqdm=True, hf_zero=config)
    trainer = hf_zero.HfZeroTrainer(model=model, args=args, train_dataset=Windows())
    trainer.train()
    engine = trainer.hf_zero_engine
    assert engine.dtype == torch.float16 and next(model.parameters()).dtype == torch.float16
    assert trainer.accelerator.mixed_precision == "no" and trainer.accelerator.scaler is None
    assert engine.global_steps == 3
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["hf_zero/loss_scale"] for h in logs][0] == 2.0 ** 8
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_hf_zero_and_deepspeed_together_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8,
                                       bos_token_id=0, eos_token_id=0))
    args = hf_zero.ZeroTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                         hf_zero={"zero_optimization": {"stage": 1}})
    args.deepspeed = "ds_config.json"   # set after construction: TrainingArguments would import deepspeed
    with pytest.raises(ValueError, match="hf_zero replaces DeepSpeed"):
        hf_zero.HfZeroTrainer(model=model, args=args)
