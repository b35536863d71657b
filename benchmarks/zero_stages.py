"""Step time, model-state bytes and traffic of hf_zero stages 0-3 against DDP and FSDP2, in one run.

    python benchmarks/zero_stages.py [--sizes 25M,100M] [--rounds 2] [--steps 3]

World size 2 on gloo, GPT-2 built from a config (micro-batch 4, seq 128, fp32 unless the
row says bf16). Systems are rebuilt and interleaved round by round so machine noise hits
all of them; the table gives the median step time over all rounds and the spread
(min-max / median). DDP uses bucket_cap_mb=25; hf_zero buckets are the same 25 MiB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_zero  # noqa: E402
from hf_zero.testing import run_on_ranks  # noqa: E402

MICRO, SEQ = 4, 128
BUCKET_NUMEL = 25 * 2**20 // 4   # 25 MiB of fp32, DDP's default bucket
SIZES = {"25M": dict(n_embd=256, n_layer=12, n_head=4), "100M": dict(n_embd=768, n_layer=8, n_head=12)}
SYSTEMS = ["ddp", "ddp_fused", "zero0", "zero1", "zero2", "zero3", "zero3_noprefetch", "zero3_capped", "fsdp2",
           "zero1_bf16", "zero2_bf16", "zero3_bf16"]


def stage3_knobs(system: str, model: torch.nn.Module) -> dict:
    """zero3: DeepSpeed's defaults (prefetch 5e7 elements, persistence 1e5); _noprefetch: none;
    _capped: one block prefetched, live cap = root + two blocks."""
    if system.endswith("noprefetch"):
        return {"stage3_prefetch_bucket_size": 0}
    if system.endswith("capped"):
        block = sum(p.numel() for p in model.transformer.h[0].parameters())
        root = sum(p.numel() for p in model.parameters()) - block * len(model.transformer.h)
        return {"stage3_prefetch_bucket_size": block, "stage3_max_live_parameters": root + 2 * block}
    return {}


def build_model(size: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SIZES[size])
    return GPT2LMHeadModel(config)


def formula(stage: int, psi: int, world: int, mixed: bool) -> float:
    if mixed:
        return {0: 16 * psi, 1: 4 * psi + 12 * psi / world, 2: 2 * psi + 14 * psi / world, 3: 16 * psi / world}[stage]
    return {0: 16 * psi, 1: 8 * psi + 8 * psi / world, 2: 4 * psi + 12 * psi / world, 3: 16 * psi / world}[stage]


def _distinct_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def run_system(system: str, size: str, rank: int, world: int, steps: int) -> dict:
    model = build_model(size)
    psi = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, model.config.vocab_size, (MICRO, SEQ), generator=g) for _ in range(steps + 1)]
    times, extra = [], {}
    if system == "fsdp2":
        return run_fsdp2(model, psi, data, world)
    if system.startswith("ddp"):
        ddp = DDP(model, bucket_cap_mb=25)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=system == "ddp_fused")
        for i, x in enumerate(data):
            start = time.perf_counter()
            ddp(input_ids=x, labels=x).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=False)
            if i:
                times.append(time.perf_counter() - start)
        state = [t for s in opt.state.values() for t in s.values()]
        model_state = _distinct_bytes(list(model.parameters()) + [p.grad for p in model.parameters()] + state)
        stage, mixed, comm_ratio = 0, False, 2.0  # DDP all-reduces every gradient once: 2x by definition
    else:
        stage, mixed = int(system[4]), system.endswith("bf16")
        config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 1.0, "bf16": {"enabled": mixed},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                  "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET_NUMEL,
                                        "allgather_bucket_size": BUCKET_NUMEL,
                                        **(stage3_knobs(system, model) if stage == 3 else {})}}
        engine = hf_zero.initialize(model, config)
        for i, x in enumerate(data):
            if i == 1:
                engine.reset_comm_stats()
            start = time.perf_counter()
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
            if i:
                times.append(time.perf_counter() - start)
        mem = engine.memory_breakdown()
        model_state = mem["params"] + mem["grads"] + mem["master_params"] + mem["optimizer_states"]
        comm = sum(v["bytes"] for v in engine.comm_stats().values())
        comm_ratio = comm / steps / (psi * (2 if mixed else 4))
        extra = {"persistent": mem["persistent_params"]}
        if stage == 3:
            element = 2 if mixed else 4
            cap = config["zero_optimization"].get("stage3_max_live_parameters")
            largest = max(u.numel for u in engine.stage.units + [engine.stage.root])
            extra.update(peak_live=engine.stage.peak_live_numel * element,
                         live_bound=(cap + largest) * element if cap else float("nan"))
        engine.destroy()
    return {"times": times, "psi": psi, "model_state": model_state,
            "state_ratio": model_state / formula(stage, psi, world, mixed), "comm_ratio": comm_ratio, **extra}


def run_fsdp2(model, psi: int, data: list, world: int) -> dict:
    """PyTorch FSDP2: fully_shard per transformer block and the root, fused AdamW, gloo."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for i, x in enumerate(data):
        start = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        if i:
            times.append(time.perf_counter() - start)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    tensors = [local(p) for p in model.parameters()] + [local(p.grad) for p in model.parameters()]
    tensors += [local(t) for st in opt.state.values() for t in st.values() if t.numel() > 1]
    model_state = _distinct_bytes(tensors)
    return {"times": times, "psi": psi, "model_state": model_state,
            "state_ratio": model_state / formula(3, psi, world, False), "comm_ratio": float("nan")}


def bench_rank(rank: int, world: int, sizes: list[str], systems: list[str], rounds: int, steps: int) -> dict:
    results: dict = {}
    for size in sizes:
        for _ in range(rounds):
            for system in systems:
                r = run_system(system, size, rank, world, steps)
                entry = results.setdefault((size, system), {**r, "times": []})
                entry["times"] += r["times"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25M,100M")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    sizes, systems = args.sizes.split(","), args.systems.split(",")
    per_rank = run_on_ranks(bench_rank, 2, sizes, systems, args.rounds, args.steps, timeout_s=3600)
    print(f"world 2, gloo, micro-batch {MICRO}, seq {SEQ}, {args.rounds} rounds x {args.steps} timed steps")
    print("| model | system | median step s | spread | / DDP | / DDP fused | / zero2 | model-state MB/rank "
          "| / ZeRO formula | persistent MB | comm / model bytes | peak gathered MB (bound) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        base = {}
        for system in systems:
            # a step is as slow as its slowest rank
            steps = [max(t) for t in zip(*(r[(size, system)]["times"] for r in per_rank))]
            med = statistics.median(steps)
            base[system] = med
            r0 = per_rank[0][(size, system)]
            spread = (max(steps) - min(steps)) / med
            rel = med / base["ddp"] if "ddp" in base else float("nan")
            rel_fused = med / base["ddp_fused"] if "ddp_fused" in base else float("nan")
            rel_zero2 = med / base["zero2" + ("_bf16" if system.endswith("bf16") else "")] \
                if ("zero2" + ("_bf16" if system.endswith("bf16") else "")) in base else float("nan")
            live = (f"{r0['peak_live'] / 2**20:.1f} ({r0['live_bound'] / 2**20:.1f})" if "peak_live" in r0 else "")
            print(f"| {size} ({r0['psi'] / 1e6:.1f}M) | {system} | {med:.3f} | {spread:.0%} | {rel:.2f} | "
                  f"{rel_fused:.2f} | {rel_zero2:.2f} | {r0['model_state'] / 2**20:.1f} | {r0['state_ratio']:.3f} | "
                  f"{r0.get('persistent', 0) / 2**20:.2f} | {r0['comm_ratio']:.3f} | {live} |")


if __name__ == "__main__":
    main()
