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


def mixtral(seed: int = 0) -> torch.nn.Module:
    """Fused MoE experts: the forward indexes ``gate_up_proj[e]``, and saves such views."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                           num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def _gathered_bytes(stage) -> int:
    """What the stage says is gathered now (every unit and the persistent set)."""
    units = stage._all_units + [stage.persistent]
    return sum(g.full_bytes for u in units for g in u.all_groups if g.gathered)


def _measure(rank: int, bf16: bool, checkpointing, build=llama) -> dict:
    model = build()
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
    out = {(bf16, ckpt): _measure(rank, bf16, ckpt) for bf16 in (False, True) for ckpt in (None, False, True)}
    out["moe"] = _measure(rank, False, None, build=mixtral)
    out["edit"] = gathered_edit_keeps_masters(rank)
    return out


def _master_values(engine) -> list[torch.Tensor]:
    return [m.detach().clone() for group in engine.masters.masters for m in group]


def gathered_edit_keeps_masters(rank: int) -> dict:
    """bf16 with fp32 masters: after some steps, rank 0 edits one row of the head under
    GatheredParameters(modifier_rank=0); only that row's masters may change."""
    import logging

    model = llama(num_layers=2, hidden=32)
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": MICRO, "bf16": {"enabled": True},
                                        "optimizer": {"params": {"lr": 1e-2}},
                                        "zero_optimization": {"stage": 3, "reduce_bucket_size": 3000,
                                                              "stage3_param_persistence_threshold": 0}})
    for step in range(2):
        x = batch(rank, step, 0)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    before = _master_values(engine)
    head = model.lm_head.weight
    with hf_zero.GatheredParameters(head, modifier_rank=0):
        if rank == 0:
            with torch.no_grad():
                head[3].fill_(0.25)
    after = _master_values(engine)
    changed = sum(int((a != b).sum()) for a, b in zip(after, before))
    with hf_zero.GatheredParameters(head):
        edited_everywhere = bool((head[3] == 0.25).all())
    has_quarter = sum(int((a == 0.25).sum()) for a in after)   # this rank's share of the edited row
    x = batch(rank, 5, 0)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    engine.destroy()

    # stages 0-2: nothing is partitioned, so the call must say it does nothing
    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("hf_zero.gathered").addHandler(handler)
    plain = llama(num_layers=2, hidden=32)
    engine2 = hf_zero.initialize(plain, {"train_micro_batch_size_per_gpu": MICRO,
                                         "zero_optimization": {"stage": 2}})
    with hf_zero.GatheredParameters(plain.lm_head.weight, modifier_rank=0):
        pass
    logging.getLogger("hf_zero.gathered").removeHandler(handler)
    engine2.destroy()
    return {"changed": changed, "has_quarter": has_quarter, "edited_everywhere": edited_everywhere,
            "stage2_warned": any("does nothing" in r.getMessage() for r in records)}
