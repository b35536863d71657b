"""Rank functions for the stage-3 parameter-offload tests (offload_param cpu / nvme).

References: DDP + torch.optim.AdamW (parity_cases.run_ddp, stage3_hard_cases' LoRA
reference) for the training runs; for bf16 and resume, the same engine without parameter
offload (itself tested against DDP in test_parity.py), which must agree bit for bit since
offload moves where a shard lives, not what is computed.
"""

from __future__ import annotations

from pathlib import Path

import torch

import hf_zero
import offload_cases as oc
import parity_cases as pc
import stage3_hard_cases as hc


def config(world: int, param: str, optimizer: str, swap: str, accum: int = 1, clip: float = pc.CLIP,
           bf16: bool = False, max_in_cpu: int = 0) -> dict:
    cfg = pc.zero_config(3, accum, clip, world, bf16)
    cfg["zero_optimization"].update(
        sub_group_size=7000,
        offload_param={"device": param, "nvme_path": swap if param == "nvme" else None, "max_in_cpu": max_in_cpu,
                       "buffer_count": 2, "buffer_size": 20000},
        offload_optimizer={"device": optimizer, "nvme_path": swap if optimizer == "nvme" else None,
                           "buffer_count": 2})
    return cfg


def mapped_rss_bytes(directory: str) -> int:
    """Resident bytes of this process's mappings of files under ``directory`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:   # a mapping's header line
                inside = len(fields) >= 6 and fields[5].startswith(directory)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def _run(rank: int, world: int, cfg: dict, swap: str, steps: int = pc.NUM_STEPS, accum: int = 1,
         build=pc.tiny_gpt2) -> dict:
    model = build()
    opt = torch.optim.AdamW(pc.param_groups(model), lr=pc.LR, eps=pc.EPS)
    engine = hf_zero.initialize(model, cfg, optimizer=opt)
    losses, mapped_after_step = [], []
    for step in range(steps):
        losses += oc.train(engine, rank, step, 1, accum)
        mapped_after_step.append(mapped_rss_bytes(swap))
    out = {"losses": losses, "mem": engine.memory_breakdown(), "mapped_after_step": mapped_after_step,
           "read_ahead": engine.param_store.num_read_ahead, "dirs_during": oc.swap_dirs(swap, rank),
           "shard_bytes": sum(g.shard.numel() * g.shard.element_size() for g in engine.stage.parameter_groups())}
    engine.destroy()
    out["params"] = pc.full_params(model)
    out["dirs_after"] = oc.swap_dirs(swap, rank)
    return out


def parity_grid(rank: int, world: int, swap: str) -> dict:
    """fp32 against DDP + AdamW for offload_param x offload_optimizer; bf16 against the same
    optimizer offload without parameter offload."""
    out = {}
    for accum, clip in ((1, pc.CLIP), (2, 0.0)):
        ref_losses, ref_params, _ = pc.run_ddp(rank, accum, clip)
        for param in ("cpu", "nvme"):
            for optimizer in ("none", "cpu", "nvme"):
                run = _run(rank, world, config(world, param, optimizer, swap, accum, clip), swap, accum=accum)
                out[("fp32", accum, clip, param, optimizer)] = (ref_losses, ref_params, run)
    for param, optimizer in (("nvme", "nvme"), ("nvme", "none"), ("cpu", "cpu")):
        ref = _run(rank, world, config(world, "none", optimizer, swap, bf16=True), swap)
        out[("bf16", 1, pc.CLIP, param, optimizer)] = (ref["losses"], ref["params"],
                                                      _run(rank, world, config(world, param, optimizer, swap,
                                                                               bf16=True), swap))
    # max_in_cpu keeps the first shards (in build order) in memory, the rest in files.
    half = _run(rank, world, config(world, "nvme", "cpu", swap, max_in_cpu=10**9), swap, steps=1)
    out["max_in_cpu_all"] = half["mem"]
    return out


def lora_nvme(rank: int, world: int, swap: str) -> dict:
    """LoRA with its frozen base sharded into NVMe files, against DDP (with and without
    non-reentrant activation checkpointing)."""
    ref_losses, ref_params = hc._ddp_reference(hc.lora_gpt2, rank, hc._lm_loss)
    out = {"ref": ref_losses}
    zero = {"stage3_param_persistence_threshold": 0,
            "offload_param": {"device": "nvme", "nvme_path": swap, "max_in_cpu": 0},
            "offload_optimizer": {"device": "cpu"}}
    for reentrant in (None, False):
        run = hc._hf_zero_run(hc.lora_gpt2, rank, hc._lm_loss, zero,
                              prepare=lambda m, r=reentrant: hc._enable_checkpointing(m, r))
        run["param_diff"] = hc._max_diff(run.pop("params"), ref_params)
        out[reentrant] = run
    return out


def resume(rank: int, world: int, swap: str, ckpt: str) -> dict:
    """Save at step 2 with parameters on NVMe, resume into nvme / none; compare with a run
    that never stopped."""
    cfg = config(world, "nvme", "nvme", swap, bf16=True)
    straight = _run(rank, world, cfg, swap, steps=4)
    out = {"straight": straight["losses"]}

    def engine_for(cfg):
        model = pc.tiny_gpt2()
        return hf_zero.initialize(model, cfg, optimizer=torch.optim.AdamW(pc.param_groups(model), lr=pc.LR,
                                                                          eps=pc.EPS))

    first = engine_for(cfg)
    head = oc.train(first, rank, 0, 2)
    first.save_checkpoint(ckpt, tag="s2")
    out["mapped_after_save"] = mapped_rss_bytes(swap)
    first.destroy()
    for target in ("nvme", "none"):
        engine = engine_for(config(world, target, target, swap, bf16=True))
        engine.load_checkpoint(ckpt, tag="s2")
        out[f"mapped_after_load_{target}"] = mapped_rss_bytes(swap)
        out[target] = head + oc.train(engine, rank, 2, 2)
        engine.destroy()
    return out


def setup_errors(rank: int, world: int, swap: str) -> dict:
    """Bad offload_param settings: the error (type, message) raised by initialize."""
    out = {}
    cases = {
        "stage2": (2, {"device": "cpu"}),
        "no_path": (3, {"device": "nvme"}),
        "missing_path": (3, {"device": "nvme", "nvme_path": str(Path(swap) / "does-not-exist")}),
    }
    for name, (stage, param) in cases.items():
        cfg = pc.zero_config(stage, 1, pc.CLIP, world)
        cfg["zero_optimization"]["offload_param"] = param
        try:
            hf_zero.initialize(pc.tiny_gpt2(), cfg)
            out[name] = None
        except Exception as err:   # noqa: BLE001 - the test inspects what was raised
            out[name] = (type(err).__name__, str(err))
    return out


def construction_on_nvme(rank: int, world: int, swap: str, saved_dir: str) -> dict:
    """zero_init and from_pretrained write each rank's slices straight into mapped shard files:
    the values must equal the same construction without offload, and training from the
    pretrained slices must match DDP on the original model."""
    from transformers import AutoModelForCausalLM

    zero = {"stage": 3, "reduce_bucket_size": 3000, "stage3_param_persistence_threshold": 0}
    nvme = {**zero, "offload_param": {"device": "nvme", "nvme_path": swap, "max_in_cpu": 0}}
    cfg = {"train_micro_batch_size_per_gpu": pc.MICRO, "gradient_clipping": 0.0}

    def gathered(model):
        with hf_zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}

    out = {}
    for name, block in (("none", zero), ("nvme", nvme)):
        with hf_zero.zero_init(seed=7):
            model = AutoModelForCausalLM.from_config(pc.tiny_gpt2().config)
        engine = hf_zero.initialize(model, {**cfg, "zero_optimization": block})
        out[f"init_{name}"] = gathered(model)
        out[f"init_{name}_files"] = engine.memory_breakdown()["param_nvme"]
        engine.destroy()
    ref_losses, ref_params, _ = pc.run_ddp(rank, 1, 0.0)
    model = hf_zero.from_pretrained(saved_dir)
    engine = hf_zero.initialize(model, {**cfg, "zero_optimization": nvme},
                                optimizer=torch.optim.AdamW(pc.param_groups(model), lr=pc.LR, eps=pc.EPS))
    out["pretrained_losses"] = oc.train(engine, rank, 0, pc.NUM_STEPS)
    out["ref_losses"] = ref_losses
    engine.destroy()
    out["pretrained_diff"] = max((p.detach() - ref_params[n]).abs().max().item() for n, p in model.named_parameters())
    return out
