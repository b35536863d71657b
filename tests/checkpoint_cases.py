"""Rank functions for checkpoint tests: exact resume, resharding against DDP, consolidation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import hf_zero
from parity_cases import EPS, LR, MICRO, VOCAB, batch, param_groups, tiny_gpt2

STEPS = 3


def _config(stage: int, world: int, bf16: bool = False, accum: int = 1) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accum,
            "gradient_clipping": 0.05, "bf16": {"enabled": bf16},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": LR, "warmup_num_steps": 5,
                                                         "warmup_type": "linear"}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000, "allgather_bucket_size": 5000,
                                  "stage3_param_persistence_threshold": 100}}


def _engine(stage: int, world: int, bf16: bool = False, accum: int = 1, dropout: float = 0.1):
    model = tiny_gpt2(dropout=dropout)
    opt = torch.optim.AdamW(param_groups(model), lr=LR, eps=EPS)
    return model, hf_zero.initialize(model, _config(stage, world, bf16, accum), optimizer=opt)


def _train(engine, rank: int, first_step: int, steps: int) -> list[float]:
    losses = []
    for step in range(first_step, first_step + steps):
        for micro in range(engine.gradient_accumulation_steps):
            x = batch(rank, step, micro)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def _params(model, engine=None) -> dict[str, torch.Tensor]:
    """Full parameters; under stage 3 gathered for the snapshot and released again (collective)."""
    with hf_zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def exact_resume(rank: int, world: int, root: str) -> dict:
    """Save after STEPS, continue; a fresh engine loads and continues: losses must be identical
    (dropout on, so RNG state matters; WarmupLR, so the scheduler state matters)."""
    out = {}
    for stage in (0, 1, 2, 3):
        for bf16 in (False, True):
            accum = 2 if stage in (1, 3) else 1
            model, engine = _engine(stage, world, bf16, accum)
            _train(engine, rank, 0, STEPS)
            path = engine.save_checkpoint(f"{root}/resume-{stage}-{bf16}", client_state={"seen": STEPS})
            uninterrupted = _train(engine, rank, STEPS, STEPS)
            engine.destroy()
            torch.manual_seed(1234 + rank)   # scramble the RNG: the load must restore it
            model, engine = _engine(stage, world, bf16, accum)
            loaded_path, client = engine.load_checkpoint(f"{root}/resume-{stage}-{bf16}")
            resumed = _train(engine, rank, STEPS, STEPS)
            out[(stage, bf16)] = (uninterrupted, resumed, client, str(path) == str(loaded_path))
            engine.destroy()
    return out


def _ddp_train(model, opt, rank: int, first_step: int, steps: int) -> list[float]:
    ddp = DDP(model)
    losses = []
    for step in range(first_step, first_step + steps):
        x = batch(rank, step, 0)
        loss = ddp(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _ddp_reference(rank: int, state: dict | None, first_step: int) -> tuple[list[float], dict]:
    """DDP + AdamW with a constant lr (the reference has no scheduler; hf_zero runs here use
    none either). ``state`` is a full model+optimizer state from an earlier DDP run."""
    model = tiny_gpt2()
    opt = torch.optim.AdamW(param_groups(model), lr=LR, eps=EPS)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    losses = _ddp_train(model, opt, rank, first_step, STEPS)
    return losses, {"model": {k: v.clone() for k, v in model.state_dict().items()},
                    "optimizer": opt.state_dict()}


def _plain_engine(stage: int, world: int):
    model = tiny_gpt2()
    opt = torch.optim.AdamW(param_groups(model), lr=LR, eps=EPS)
    config = _config(stage, world)
    config.pop("scheduler")
    return model, hf_zero.initialize(model, config, optimizer=opt)


def reshard_save(rank: int, world: int, root: str, stages: tuple) -> dict:
    """Train STEPS with hf_zero (each stage) and with DDP; save; return DDP's full state."""
    ddp_losses, ddp_state = _ddp_reference(rank, None, 0)
    out = {"ddp_state": ddp_state if rank == 0 else None}
    for stage in stages:
        model, engine = _plain_engine(stage, world)
        losses = _train(engine, rank, 0, STEPS)
        engine.save_checkpoint(f"{root}/w{world}-s{stage}", tag="ckpt")
        params = _params(model, engine)
        out[stage] = {"losses": losses, "ddp_losses": ddp_losses, "params": params if rank == 0 else None}
        engine.destroy()
    return out


def reshard_load(rank: int, world: int, root: str, ddp_state: dict, sources: list) -> dict:
    """Continue the DDP reference at this world size, and each hf_zero checkpoint at each stage."""
    ddp_losses, _ = _ddp_reference(rank, ddp_state, STEPS)
    out = {"ddp_losses": ddp_losses}
    for saved_world, saved_stage, stage in sources:
        model, engine = _plain_engine(stage, world)
        engine.load_checkpoint(f"{root}/w{saved_world}-s{saved_stage}", tag="ckpt")
        loaded = _params(model, engine)
        out[(saved_world, saved_stage, stage)] = {"losses": _train(engine, rank, STEPS, STEPS),
                                                  "loaded_params": loaded if rank == 0 else None}
        engine.destroy()
    return out


def exports(rank: int, world: int, root: str) -> dict:
    """Checkpoints to consolidate: tied GPT-2, untied Llama, a LoRA adapter; and save_16bit_model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    model, engine = _plain_engine(3, world)
    _train(engine, rank, 0, 2)
    engine.save_checkpoint(f"{root}/gpt2")
    engine.save_16bit_model(f"{root}/gpt2-online-stage3")   # gathered shard by shard
    out["gpt2"] = _params(model, engine)
    engine.destroy()
    model, engine = _plain_engine(2, world)
    engine.load_checkpoint(f"{root}/gpt2")
    engine.save_16bit_model(f"{root}/gpt2-online")
    engine.destroy()

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64, tie_word_embeddings=False))
    engine = hf_zero.initialize(llama, {**_config(1, world), "optimizer": {"params": {"lr": LR}}})
    _train(engine, rank, 0, 2)
    engine.save_checkpoint(f"{root}/llama")
    out["llama"] = _params(llama)
    engine.destroy()

    base = tiny_gpt2()
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                           init_lora_weights=False))
    engine = hf_zero.initialize(lora, {**_config(2, world), "optimizer": {"params": {"lr": LR}}})
    _train(engine, rank, 0, 2)
    engine.save_checkpoint(f"{root}/lora")
    out["lora"] = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    engine.destroy()
    return out if rank == 0 else {}


def saved_tensor_file(root: str, name: str) -> Path:
    return next(Path(root, name).glob("*/rank_00000.safetensors"))


def roundtrip_first(rank: int, world: int, root: str) -> list[float]:
    """bf16 stage 2 at world 2: save after STEPS, then the uninterrupted continuation."""
    model, engine = _engine(2, world, bf16=True)
    _train(engine, rank, 0, STEPS)
    engine.save_checkpoint(f"{root}/rt-a")
    losses = _train(engine, rank, STEPS, STEPS)
    engine.destroy()
    return losses


def roundtrip_middle(rank: int, world: int, root: str) -> None:
    """At another world size and stage: load, then save again straight away."""
    model, engine = _engine(1, world, bf16=True)
    engine.load_checkpoint(f"{root}/rt-a")
    engine.save_checkpoint(f"{root}/rt-b")
    engine.destroy()


def roundtrip_last(rank: int, world: int, root: str) -> list[float]:
    model, engine = _engine(2, world, bf16=True)
    engine.load_checkpoint(f"{root}/rt-b")
    losses = _train(engine, rank, STEPS, STEPS)
    engine.destroy()
    return losses
