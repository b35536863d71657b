"""Rank functions for fp16 loss scaling, memory accounting and communication volume."""

from __future__ import annotations

import torch

import hf_zero
from parity_cases import MICRO, batch, tiny_gpt2


def _fp16_engine(stage: int, world: int, hysteresis: int):
    model = tiny_gpt2()
    config = {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
              "fp16": {"enabled": True, "initial_scale_power": 8, "hysteresis": hysteresis},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000,
                                    "stage3_param_persistence_threshold": 0}}
    return model, hf_zero.initialize(model, config)


def _train_step(engine, model, rank: int, step: int, poison: bool) -> dict:
    handle = None
    if poison:  # only this rank sees the inf: the skip must still happen everywhere
        handle = model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: g * float("inf"))
    # model parameters (empty at rest under stage 3) and this rank's fp32 master chunks
    state = lambda: [p.detach().clone() for p in model.parameters()] + \
        [m.detach().clone() for group in engine.masters.masters for m in group]  # noqa: E731
    before = state()
    x = batch(rank, step, 0)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    if handle is not None:
        handle.remove()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, state()))
    return {"skipped": engine.optimizer.step_was_skipped, "scale": engine.loss_scale,
            "unchanged": unchanged}


def fp16_overflow(rank: int, world: int) -> dict:
    """Per (stage, hysteresis): a clean step, then overflows injected on rank 1 only."""
    out = {}
    for stage in (0, 1, 2, 3):
        for hysteresis in (1, 2):
            model, engine = _fp16_engine(stage, world, hysteresis)
            assert model.transformer.wte.weight.dtype == torch.float16
            steps = [_train_step(engine, model, rank, 0, poison=False)]
            for step in (1, 2):
                steps.append(_train_step(engine, model, rank, step, poison=rank == 1))
            steps.append(_train_step(engine, model, rank, 3, poison=False))
            out[(stage, hysteresis)] = steps
            engine.destroy()
    return out


def steady_step_memory(engine, x: torch.Tensor) -> tuple[dict, int]:
    """One more step after the first (buffers and states exist) with fresh comm counters:
    the engine's memory breakdown and its model-state bytes (params + grads + masters + states)."""
    engine.reset_comm_stats()
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    mem = engine.memory_breakdown()
    return mem, mem["params"] + mem["grads"] + mem["master_params"] + mem["optimizer_states"]


def formula_bytes(stage: int, psi: int, world: int, mixed: bool) -> int:
    """ZeRO's model-state bytes per rank (K = 12 for mixed precision)."""
    if mixed:
        return {0: 16 * psi, 1: 4 * psi + 12 * psi // world, 2: 2 * psi + 14 * psi // world,
                3: 16 * psi // world}[stage]
    return {0: 16 * psi, 1: 8 * psi + 8 * psi // world, 2: 4 * psi + 12 * psi // world, 3: 16 * psi // world}[stage]


def accounting(rank: int, world: int) -> dict:
    """Model-state bytes vs ZeRO's formula and communicated bytes per step, per stage/dtype."""
    out = {}
    for stage in (0, 1, 2, 3):
        for bf16 in (False, True):
            model = tiny_gpt2(n_embd=128, n_layer=2)
            psi = sum(p.numel() for p in model.parameters())
            config = {"train_micro_batch_size_per_gpu": MICRO, "bf16": {"enabled": bf16},
                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                      "zero_optimization": {"stage": stage, "reduce_bucket_size": 50_000,
                                            "stage3_param_persistence_threshold": 0}}
            engine = hf_zero.initialize(model, config)
            x = batch(rank, 0, 0)
            engine.backward(engine(input_ids=x, labels=x).loss)
            full_grads_after_backward = [p.grad is not None for p in model.parameters()]
            engine.step()
            mem, model_state = steady_step_memory(engine, x)
            model_bytes = psi * (2 if bf16 else 4)
            out[(stage, bf16)] = {
                "ratio": model_state / formula_bytes(stage, psi, world, bf16),
                "comm_ratio": sum(v["bytes"] for v in engine.comm_stats().values()) / model_bytes,
                "comm": engine.comm_stats(),
                "any_full_grad": any(full_grads_after_backward),
                "num_buckets": len(engine.stage.buckets),
                "mem": mem,
            }
            engine.destroy()
    return out
