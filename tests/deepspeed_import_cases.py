"""Rank functions for tests/test_deepspeed_import.py: resume imported DeepSpeed checkpoints."""

from __future__ import annotations

import torch
import torch.distributed as dist

import deepspeed_fixture_spec as spec
import hf_zero


def hf_zero_config(name: str, stage: int, world_size: int) -> dict:
    """The fixture's DeepSpeed config at another world size / stage; the optimizer comes from the
    script (two weight-decay groups, as DeepSpeed got them)."""
    config = spec.config(name)
    config.pop("optimizer")
    config.pop("data_types", None)   # DeepSpeed's grad_accum_dtype: hf_zero accumulates in fp32 masters
    config["train_micro_batch_size_per_gpu"] = spec.GLOBAL_BATCH // world_size
    config["zero_optimization"] = {"stage": stage}
    return config


def _global_mean(loss: torch.Tensor, world_size: int) -> float:
    """Equal micro-batches: the mean of the ranks' losses is the global batch's loss."""
    mean = loss.detach().float().clone()
    if dist.is_initialized():
        dist.all_reduce(mean)
    return mean.item() / world_size


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = spec.config("stage1_fp32")["optimizer"]["params"]
    return torch.optim.AdamW(spec.param_groups(model), lr=params["lr"], betas=tuple(params["betas"]),
                             eps=params["eps"])


def resume(rank: int, world_size: int, imported: dict, plan: list) -> dict:
    """For each (checkpoint key, fixture, stage): load ``imported[key]`` into a fresh engine set
    up as the fixture at this world size and stage, then train the recorded steps; returns the
    global-batch losses by (key, stage)."""
    torch.set_num_threads(1)
    results = {}
    for key, name, stage in plan:
        model = spec.build_model(name)
        engine = hf_zero.initialize(model, hf_zero_config(name, stage, world_size), optimizer=_optimizer(model))
        engine.load_checkpoint(imported[key])
        losses, lrs, scales = [], [], []
        for step in range(spec.SAVE_AFTER_STEPS, spec.SAVE_AFTER_STEPS + spec.RECORDED_STEPS):
            ids = spec.rank_batch(step, rank, world_size)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(_global_mean(loss, world_size))
            lrs.append(engine.optimizer.param_groups[0]["lr"])
            scales.append(engine.scaler.scale)
        results[(key, stage)] = {"losses": losses, "global_steps": engine.global_steps,
                                  "lrs": lrs, "scales": scales,
                                  "skipped": engine.optimizer.num_skipped_steps}
        engine.destroy()
    return results

