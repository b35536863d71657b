"""Rank functions for the offload tests: the same run with offload to cpu / nvme and without.

The reference is always the same engine with ``offload_optimizer.device = "none"`` (itself
tested against DDP + torch.optim.AdamW in test_parity.py), same seed and data per rank.
Runs inside processes spawned once per test module by ``hf_zero.testing.run_on_ranks``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import hf_zero
import parity_cases as pc

STEPS = 4
SUB_GROUP = 7000   # several sub-groups per rank, chunks split across them


def config(stage: int, world: int, device: str, swap: str, bf16: bool = False, accum: int = 1,
           clip: float = pc.CLIP) -> dict:
    cfg = pc.zero_config(stage, accum, clip, world, bf16)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": pc.LR, "eps": pc.EPS, "weight_decay": pc.WEIGHT_DECAY}}
    cfg["zero_optimization"].update(sub_group_size=SUB_GROUP, offload_optimizer={
        "device": device, "nvme_path": swap if device == "nvme" else None, "buffer_count": 2})
    return cfg


def train(engine, rank: int, first: int, steps: int, accum: int = 1) -> list[float]:
    losses = []
    for step in range(first, first + steps):
        for micro in range(accum):
            x = pc.batch(rank, step, micro)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def swap_dirs(swap: str, rank: int) -> list[str]:
    return sorted(d for d in os.listdir(swap) if d.startswith(f"hf_zero_swap_rank{rank}_"))


def _run(rank, world, stage, device, swap, bf16=False, accum=1, clip=pc.CLIP, optimizer=None):
    model = pc.tiny_gpt2()
    opt = optimizer(model) if optimizer is not None else None
    engine = hf_zero.initialize(model, config(stage, world, device, swap, bf16, accum, clip), optimizer=opt)
    losses = train(engine, rank, 0, STEPS, accum)
    mem = engine.memory_breakdown()
    mem["step_counter_bytes"] = 4 * len(engine.optimizer.inner.state)   # one fp32 scalar per master chunk
    params = pc.full_params(model) if stage < 3 else None
    during = swap_dirs(swap, rank) if device == "nvme" else None
    engine.destroy()
    params = params or pc.full_params(model)
    return losses, params, mem, during, swap_dirs(swap, rank) if device == "nvme" else None


def _adam_amsgrad(model):
    # Adam (coupled decay) with amsgrad and torch's default implementation choice.
    return torch.optim.Adam(model.parameters(), lr=pc.LR, eps=pc.EPS, weight_decay=0.01, amsgrad=True)


def parity_grid(rank: int, world: int, swap: str) -> dict:
    """Losses and final parameters with and without offload, per case."""
    cases = [(stage, False, 1, pc.CLIP) for stage in (1, 2, 3)]
    cases += [(2, True, 1, pc.CLIP), (3, True, 2, 0.0), (1, False, 2, 0.0)]
    out = {}
    for stage, bf16, accum, clip in cases:
        ref = _run(rank, world, stage, "none", swap, bf16, accum, clip)
        for device in ("cpu", "nvme"):
            out[(stage, bf16, accum, clip, device)] = (ref[:2], _run(rank, world, stage, device, swap, bf16,
                                                                     accum, clip))
    ref = _run(rank, world, 2, "none", swap, optimizer=_adam_amsgrad)
    out["adam_amsgrad"] = (ref[:2], _run(rank, world, 2, "nvme", swap, optimizer=_adam_amsgrad))
    return out


def resume_grid(rank: int, world: int, swap: str, root: str) -> dict:
    """Save after 2 steps from one backend, resume into each backend, continue 2 steps."""
    out = {}
    for stage, bf16 in ((2, False), (3, True)):
        model = pc.tiny_gpt2()
        engine = hf_zero.initialize(model, config(stage, world, "none", swap, bf16))
        uninterrupted = train(engine, rank, 0, STEPS)
        engine.destroy()
        for src in ("none", "nvme", "cpu"):
            model = pc.tiny_gpt2()
            engine = hf_zero.initialize(model, config(stage, world, src, swap, bf16))
            first = train(engine, rank, 0, 2)
            path = engine.save_checkpoint(str(Path(root) / f"s{stage}{bf16}{src}"))
            engine.destroy()
            for dst in ("none", "cpu", "nvme"):
                model = pc.tiny_gpt2(seed=1)   # other initial weights: the checkpoint must bring them
                engine = hf_zero.initialize(model, config(stage, world, dst, swap, bf16))
                engine.load_checkpoint(str(path.parent))
                out[(stage, bf16, src, dst)] = (uninterrupted, first + train(engine, rank, 2, STEPS - 2))
                engine.destroy()
    return out
