"""Rank functions: the engine's Triton-kernel update path and ZeRO++ int8 communication."""

from __future__ import annotations

import torch

import hf_zero
from parity_cases import LR, MICRO, batch, run_ddp, tiny_gpt2

STEPS_QUANT = 20


def _run(rank: int, world: int, stage: int, config_extra: dict, steps: int, bf16: bool = False,
         zero_extra: dict | None = None, memorize: bool = False):
    model = tiny_gpt2()
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.05, "bf16": {"enabled": bf16},
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "eps": 1e-6, "weight_decay": 0.01}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000, **(zero_extra or {})},
              **config_extra}
    engine = hf_zero.initialize(model, config)
    losses = []
    for step in range(steps):
        x = batch(rank, 0 if memorize else step, 0)   # memorize: one batch, so the loss must fall
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    stats = engine.comm_stats()
    kernels_used = engine.optimizer.fused is not None
    engine.destroy()
    return losses, stats, kernels_used


def triton_update_path(rank: int, world: int) -> dict:
    """fused_kernels='triton' (interpreted on CPU) against the torch update and DDP."""
    out = {}
    # DDP reference: one AdamW group here (no no-decay group), so build it the same way
    ref = _ddp_single_group(rank)
    for stage in (1, 2):
        for bf16 in (False, True):
            triton = _run(rank, world, stage, {"fused_kernels": "triton"}, 4, bf16)
            torch_path = _run(rank, world, stage, {"fused_kernels": "off"}, 4, bf16)
            out[(stage, bf16)] = (ref, triton[0], torch_path[0], triton[2], torch_path[2])
    return out


def _ddp_single_group(rank: int) -> list[float]:
    from checkpoint_cases import _ddp_train

    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-6, weight_decay=0.01)
    return _ddp_train(model, opt, rank, 0, 4)


def quantized_communication(rank: int, world: int) -> dict:
    """20 steps with int8 gradients and/or weights against the same run unquantized (bf16)."""
    out = {}
    for stage in (1, 2):
        base = _run(rank, world, stage, {}, STEPS_QUANT, bf16=True, memorize=True)
        for name, extra in (("grads", {"zero_quantized_gradients": True}),
                            ("weights", {"zero_quantized_weights": True}),
                            ("both", {"zero_quantized_gradients": True, "zero_quantized_weights": True})):
            quant = _run(rank, world, stage, {}, STEPS_QUANT, bf16=True, zero_extra=extra, memorize=True)
            out[(stage, name)] = (base[0], quant[0], base[1], quant[1])
    return out


__all__ = ["run_ddp", "quantized_communication", "triton_update_path"]
