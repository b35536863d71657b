"""Rank functions for hybrid sharding (``mics_shard_size``) at world 4: two shard groups of 2.

Parity against DDP + torch.optim.AdamW (parity_cases.py), model-state bytes against ZeRO's
formula with N = shard size, bytes per process group against docs/design.md's theory
([Note: hybrid sharding]), and a checkpoint resume. Runs inside hf_zero.testing.run_on_ranks.
"""

from __future__ import annotations

import torch

import hf_zero
from engine_cases import formula_bytes, steady_step_memory
from parity_cases import CLIP, MICRO, batch, full_params, run_ddp, run_hf_zero, tiny_gpt2, train_steps

SHARD = 2


def parity(rank: int, world: int) -> dict:
    """mics_shard_size 2 at stages 1-3 (GA 2, clipping on) against DDP."""
    ref_losses, ref_params, ref_norms = run_ddp(rank, 2, CLIP)
    out = {}
    for stage in (1, 2, 3):
        losses, params, norms = run_hf_zero(rank, world, stage, 2, CLIP, zero_extra={"mics_shard_size": SHARD})
        diff = max(((params[n] - ref_params[n]).abs().max().item(), n) for n in ref_params)
        out[stage] = (ref_losses, losses, diff, ref_norms, norms)
    losses, params, norms = run_hf_zero(rank, world, 3, 2, CLIP, zero_extra={"zero_hpz_partition_size": SHARD})
    diff = max(((params[n] - ref_params[n]).abs().max().item(), n) for n in ref_params)
    out["hpz"] = (ref_losses, losses, diff, ref_norms, norms)
    return out


def _config(stage: int, shard: int, hpz: int = 1) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 50_000, "mics_shard_size": shard,
                                  "zero_hpz_partition_size": hpz, "stage3_param_persistence_threshold": 0}}


def accounting(rank: int, world: int) -> dict:
    """Per stage and layout (-1: plain, 2: MiCS; "hpz": stage 3 with zero_hpz_partition_size 2):
    model-state bytes vs ZeRO's formula with N = partition size, and one step's bytes per
    process group."""
    out = {}
    layouts = [(stage, shard, 1) for stage in (1, 2, 3) for shard in (-1, SHARD)] + [(3, -1, SHARD)]
    for stage, shard, hpz in layouts:
        model = tiny_gpt2(n_embd=64, n_layer=2)
        psi = sum(p.numel() for p in model.parameters())
        engine = hf_zero.initialize(model, _config(stage, shard, hpz))
        x = batch(rank, 0, 0)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        mem, model_state = steady_step_memory(engine, x)
        n = world if shard == -1 else shard
        out[(stage, shard) if hpz == 1 else "hpz"] = {
            "ratio": model_state / formula_bytes(stage, psi, n, False), "model_bytes": 4 * psi,
            "model_state": model_state, "psi": psi,
            "by_group": engine.comm_stats(by_group=True), "params_bytes": mem["params"]}
        engine.destroy()
    return out


def _train(engine, model, rank: int, steps: range) -> list[float]:
    return train_steps(engine, rank, steps)


def resume(rank: int, world: int, root: str) -> dict:
    """MiCS stage 3 saves after 2 steps and trains 2 more; a fresh MiCS run and a plain
    stage-3 run load the checkpoint and train the same 2 steps."""
    out = {}
    model = tiny_gpt2()
    engine = hf_zero.initialize(model, _config(3, SHARD))
    _train(engine, model, rank, range(2))
    engine.save_checkpoint(f"{root}/mics")
    out["reference"] = _train(engine, model, rank, range(2, 4))
    engine.destroy()
    out["reference_params"] = full_params(model)
    for name, shard in (("mics", SHARD), ("plain", -1)):
        model = tiny_gpt2(seed=1)   # other weights: the load must bring every value back
        engine = hf_zero.initialize(model, _config(3, shard))
        engine.load_checkpoint(f"{root}/mics")
        out[name] = _train(engine, model, rank, range(2, 4))
        engine.destroy()
        ref = out["reference_params"]
        out[f"{name}_diff"] = max((full_params(model)[n] - ref[n]).abs().max().item() for n in ref)
    return out


def modifier_rank_edit(rank: int, world: int) -> dict:
    """GatheredParameters(modifier_rank=0) under MiCS stage 3 and hpZ: rank 0's edit (rank 2,
    shard rank 0 of the other group, edits differently) reaches every rank's values and masters."""
    out = {}
    for name, extra in (("mics", {"mics_shard_size": SHARD}), ("hpz", {"zero_hpz_partition_size": SHARD})):
        model = tiny_gpt2()
        config = _config(3, -1)
        config["zero_optimization"].update(extra)
        engine = hf_zero.initialize(model, config)
        weight = model.transformer.h[0].mlp.c_fc.weight
        with hf_zero.GatheredParameters([weight], modifier_rank=0):
            weight.data.fill_(float(rank + 1))   # only rank 0's value (1.0) may survive
        with hf_zero.GatheredParameters([weight]):
            out[name] = weight.detach().clone()
        engine.destroy()
    return out


def _frozen_mlp(seed: int) -> torch.nn.Module:
    model = tiny_gpt2(seed=seed)
    model.transformer.h[0].mlp.requires_grad_(False)
    return model


def hpz_resume_with_frozen(rank: int, world: int, root: str) -> dict:
    """hpZ: a run that trained (secondary copies made) then loads a checkpoint must not
    gather frozen parameters from copies of its old values."""
    config = _config(3, -1, SHARD)
    model = _frozen_mlp(0)
    engine = hf_zero.initialize(model, config)
    _train(engine, model, rank, range(1))
    engine.save_checkpoint(f"{root}/hpz")
    reference = _train(engine, model, rank, range(1, 3))
    engine.destroy()
    model = _frozen_mlp(1)
    engine = hf_zero.initialize(model, config)
    _train(engine, model, rank, range(1))   # other weights, secondary copies made
    engine.load_checkpoint(f"{root}/hpz")
    resumed = _train(engine, model, rank, range(1, 3))
    engine.destroy()
    return {"reference": reference, "resumed": resumed}


def all_cases(rank: int, world: int, root: str) -> dict:
    torch.manual_seed(0)
    return {"modifier": modifier_rank_edit(rank, world), "parity": parity(rank, world),
            "accounting": accounting(rank, world), "resume": resume(rank, world, root),
            "hpz_frozen": hpz_resume_with_frozen(rank, world, root)}
