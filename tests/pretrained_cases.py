"""Checkpoints in every layout transformers loads, and rank functions comparing hf_zero against it.

Reference: ``transformers.AutoModelForCausalLM.from_pretrained`` of the same directory.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

import hf_zero
from parity_cases import VOCAB, tiny_gpt2, tiny_llama

STAGES = (0, 3)


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(1)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(2)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=0))


def tiny_hrm_text():
    """HrmText: transformers chunks its fused ``gqkv_proj`` / ``gate_up_proj`` at load (Chunk(dim=0))."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "hrm_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, head_dim=16))


def tiny_sarvam_moe():
    """Sarvam-MoE: ``query_key_value`` split by the targets' sizes at load (Split(dim=0)), experts stacked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(4)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "sarvam_moe", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
        num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64))


def tiny_olmo_hybrid():
    """OlmoHybrid: its q/k/v conv kernels are concatenated at load (Concatenate(dim=0))."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(5)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "olmo_hybrid", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, linear_num_key_heads=4, linear_num_value_heads=4,
        linear_key_head_dim=48, linear_value_head_dim=48, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=0, eos_token_id=0))


# model type of each checkpoint that an older transformers (make test-compat) may not know
MODEL_TYPES = {"hrm_text": "hrm_text", "sarvam_moe": "sarvam_moe", "olmo_hybrid": "olmo_hybrid"}


def unknown_to_transformers(name: str) -> bool:
    """The checkpoint's model type is not in the installed transformers (it came in a later release)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return name in MODEL_TYPES and MODEL_TYPES[name] not in CONFIG_MAPPING


def _rewrite(src: Path, dst: Path, edit) -> None:
    """A copy of the single-file checkpoint ``src`` with its tensors edited by ``edit(dict)``."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    save_file(edit(tensors), str(dst / "model.safetensors"), metadata={"format": "pt"})


def write_checkpoints(root: Path) -> dict[str, str]:
    """name -> directory. Every directory is written by transformers' save_pretrained, or is such
    a directory with keys renamed, added, removed or reshaped."""
    dirs = {name: root / name for name in ("gpt2", "llama_sharded", "mixtral", "qwen2_moe", "hrm_text", "sarvam_moe",
                                                   "olmo_hybrid")}
    tiny_gpt2().save_pretrained(dirs["gpt2"])
    tiny_llama().save_pretrained(dirs["llama_sharded"], max_shard_size="20KB")
    tiny_mixtral().save_pretrained(dirs["mixtral"])
    tiny_qwen2_moe().save_pretrained(dirs["qwen2_moe"])
    for name, build in (("hrm_text", tiny_hrm_text),   # written fused: the reverse of the load's Chunk
                        ("sarvam_moe", tiny_sarvam_moe),
                        ("olmo_hybrid", tiny_olmo_hybrid)):   # q/k/v kernels apart: the reverse of Concatenate
        if unknown_to_transformers(name):
            del dirs[name]
        else:
            build().save_pretrained(dirs[name])
    edits = {
        # the original GPT-2 layout on the hub: no 'transformer.' prefix
        "gpt2_no_prefix": lambda t: {k.removeprefix("transformer."): v for k, v in t.items()},
        "gpt2_extra_key": lambda t: {**t, "transformer.h.0.attn.extra_scale": torch.ones(3)},
        "gpt2_missing_key": lambda t: {k: v for k, v in t.items() if k != "transformer.h.1.ln_2.weight"},
        "gpt2_wrong_shape": lambda t: {**t, "transformer.h.0.ln_1.bias": torch.zeros(5)},
    }
    for name, edit in edits.items():
        dirs[name] = root / name
        _rewrite(dirs["gpt2"], dirs[name], edit)
    return {k: str(v) for k, v in dirs.items()}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                  "reduce_bucket_size": 2000}}


def _converted_source_bytes(plan) -> int:
    """Bytes of every checkpoint tensor that feeds a weight conversion (experts, fused projections)."""
    keys = {key for _, _, sources in plan.conversions for _, key, _ in sources}
    return sum(torch.Size(plan.entries[k][2]).numel() * plan.entries[k][1].itemsize for k in keys)


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def load_against_transformers(rank: int, world: int, dirs: dict[str, str]) -> dict:
    """Max |logits difference| against transformers per (checkpoint, stage), the warnings the
    load logged, and the errors it raised."""
    from transformers import AutoModelForCausalLM

    records = _Records()
    logging.getLogger("hf_zero").addHandler(records)
    x = torch.arange(12).reshape(2, 6) % VOCAB
    out: dict = {"diff": {}, "warnings": {}, "errors": {}, "converted_bytes": {}}
    for name in ("gpt2", "gpt2_no_prefix", "llama_sharded", "mixtral", "qwen2_moe", "hrm_text", "sarvam_moe",
                 "olmo_hybrid", "gpt2_extra_key", "gpt2_missing_key"):
        if name not in dirs:
            continue   # unknown_to_transformers: the tests skip it
        reference = _logits(AutoModelForCausalLM.from_pretrained(dirs[name]), x)
        for stage in STAGES:
            records.messages.clear()
            model = hf_zero.from_pretrained(dirs[name])
            engine = hf_zero.initialize(model, _config(stage))
            out["diff"][name, stage] = (_logits(model, x) - reference).abs().max().item()
            out["converted_bytes"][name, stage] = (model._hf_zero_weights.bytes_read,
                                                   _converted_source_bytes(model._hf_zero_weights))
            out["warnings"][name, stage] = list(records.messages)
            engine.destroy()
    try:
        hf_zero.from_pretrained(dirs["gpt2_wrong_shape"])
    except ValueError as err:
        out["errors"]["wrong_shape"] = str(err)
    model = hf_zero.from_pretrained(dirs["gpt2_wrong_shape"], ignore_mismatched_sizes=True)
    engine = hf_zero.initialize(model, _config(3))
    reference = AutoModelForCausalLM.from_pretrained(dirs["gpt2_wrong_shape"], ignore_mismatched_sizes=True)
    with hf_zero.GatheredParameters(list(model.parameters())):
        loaded = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["ignored_equal_elsewhere"] = all(torch.equal(loaded[n], p.detach()) for n, p in reference.named_parameters()
                                         if n != "transformer.h.0.ln_1.bias")
    out["ignored_at_init"] = bool(loaded["transformer.h.0.ln_1.bias"].eq(0).all())   # GPT-2 inits LayerNorm bias to 0
    engine.destroy()
    return out
