"""Rank functions: stage 3 frees released parameters for real (measured storage bytes).

A Llama-shaped model (``nn.Linear`` saves ``weight.t()``, a view of the gathered weight)
without activation checkpointing: after the forward pass, the storages of gathered
parameters that autograd's saved tensors keep allocated must not exceed what the stage
says is gathered now (the root, the block whose backward comes next, persistent ones).
"""

from __future__ import annotations

import torch

import hf_zero
from hf_zero.diagnostics.saved_tensors import ParameterStorageRecorder, saved_storage_bytes
from parity_cases import MICRO, SEQ, VOCAB, batch


def llama(num_layers: int = 4, hidden: int = 64, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=SEQ, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _gathered_bytes(stage) -> int:
    """What the stage says is gathered now (every unit and the persistent set)."""
    units = stage._all_units + [stage.persistent]
    return sum(g.full_bytes for u in units for g in u.all_groups if g.gathered)


def _measure(rank: int, bf16: bool, checkpointing) -> dict:
    model = llama()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    config = {"train_micro_batch_size_per_gpu": MICRO, "optimizer": {"params": {"lr": 1e-3}},
              "bf16": {"enabled": bf16},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": 3000, "stage3_prefetch_bucket_size": 0,
                                    "stage3_param_persistence_threshold": 0}}
    engine = hf_zero.initialize(model, config)
    model_bytes = sum(p.ds_numel * p.element_size() for p in model.parameters())
    recorder = ParameterStorageRecorder(model)
    out = {"model_bytes": model_bytes, "saved": [], "allowed": [], "losses": []}
    for step in range(3):   # the first step records the order; later ones follow it
        x = batch(rank, step, 0)
        loss = engine(input_ids=x, labels=x).loss
        out["saved"].append(saved_storage_bytes([loss], among=recorder.keys))
        out["allowed"].append(_gathered_bytes(engine.stage))
        engine.backward(loss)
        engine.step()
        out["losses"].append(loss.item())
    recorder.remove()
    out["largest_unit_bytes"] = max(sum(g.full_bytes for g in u.all_groups) for u in engine.stage._all_units)
    engine.destroy()
    return out


def freed_storage(rank: int, world: int) -> dict:
    return {(bf16, ckpt): _measure(rank, bf16, ckpt) for bf16 in (False, True) for ckpt in (None, False, True)}
