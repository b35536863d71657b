"""Every file in example_configs/ loads and trains a few steps single-process.

Files with "auto" are first refused by ``initialize`` (an integration must resolve them), then
resolved as the Trainer integration would and trained. ``lora_*`` files train a LoRA model.
``*.yaml`` files are accelerate configs whose ``hf-zero:`` section is the hf_zero config.
NVMe offload files get a temporary ``nvme_path`` (the shipped one is a placeholder to edit).
"""

import json
from pathlib import Path

import pytest
import torch

import hf_zero
from hf_zero.config import AUTO, config_to_dict, read_config_dict
from hf_zero.integrations.auto_values import derived_from_hidden_size, resolve_auto
from hf_zero.integrations.launch import split_config
from parity_cases import batch, tiny_gpt2

DIR = Path(__file__).resolve().parent.parent.joinpath("example_configs")
FILES = sorted([*DIR.glob("*.json"), *DIR.glob("*.yaml")])

# What a Trainer with these arguments would fill in (see hf_zero/integrations/trainer.py).
TRAINER_VALUES = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
                  "gradient_clipping": 1.0, "fp16.enabled": False, "bf16.enabled": False,
                  "optimizer.params.lr": 1e-4, "optimizer.params.betas": (0.9, 0.999),
                  "optimizer.params.eps": 1e-8, "optimizer.params.weight_decay": 0.0}
DERIVED = {"scheduler.params.warmup_min_lr": 0.0, "scheduler.params.warmup_max_lr": 1e-4,
           "scheduler.params.warmup_num_steps": 2, "scheduler.params.total_num_steps": 10}


def has_auto(value) -> bool:
    if isinstance(value, dict):
        return any(has_auto(v) for v in value.values())
    return value == AUTO


def raw_config(path: Path) -> dict:
    if path.suffix == ".yaml":
        accelerate_part, section, _ = split_config(str(path))
        assert accelerate_part["num_processes"] >= 2
        return json.loads(section)
    return read_config_dict(str(path))[0]


def test_there_are_examples():
    names = {p.name for p in FILES}
    assert len(FILES) >= 12
    assert {"zero3_offload_cpu.json", "zero2_offload_nvme.json", "zero3_infinity_nvme.json", "lora_zero2.json",
            "lora_zero3.json", "accelerate_zero3.yaml"} <= names


def build_model(path: Path) -> torch.nn.Module:
    model = tiny_gpt2()
    if path.name.startswith("lora_"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 lora_dropout=0.0))
    return model


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_config(path, tmp_path):
    raw = raw_config(path)
    for key in ("offload_optimizer", "offload_param"):
        offload = raw["zero_optimization"].get(key, {})
        if offload.get("device") == "nvme":
            offload["nvme_path"] = str(tmp_path)
    config = hf_zero.load_config(raw)
    assert config_to_dict(config)["zero_optimization"]["stage"] == raw["zero_optimization"]["stage"]
    if has_auto(raw):
        with pytest.raises(hf_zero.ConfigError, match="auto"):
            hf_zero.initialize(tiny_gpt2(), config)
        config = resolve_auto(raw, TRAINER_VALUES, {**DERIVED, **derived_from_hidden_size(32)}, "the test")
    model = build_model(path)
    engine = hf_zero.initialize(model, config)
    # this rank's fp32 master chunks: what the optimizer updates, at every stage
    def masters():   # through the offload protocol: NVMe-held masters are not resident
        return [torch.cat([part.clone() for part in engine.offload.read_state("master", gi, ci, 0, m.numel())])
                for gi, group in enumerate(engine.masters.masters) for ci, m in enumerate(group)]

    before = masters()
    # 3 steps: DeepSpeed's WarmupLR gives the first two optimizer steps warmup_min_lr (0 here)
    for step in range(3 * engine.gradient_accumulation_steps):
        x = batch(0, step, 0)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    assert torch.isfinite(loss)
    assert engine.global_steps == 3
    moved = any(not torch.equal(a, b) for a, b in zip(before, masters()))
    # fp16 may skip its first steps while the dynamic scale settles; others must move.
    assert moved or engine.optimizer.num_skipped_steps > 0
    if path.name.startswith("lora_"):   # only the adapter trains: no partition of the frozen base
        trainable = {id(p) for g in engine.flat_groups for p in g.params}
        assert all("lora_" in n for n, p in model.named_parameters() if id(p) in trainable)
