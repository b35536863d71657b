"""Bytes per process group and step time: plain stage 3, MiCS and hpZ at world 4 (gloo, CPU).

    python benchmarks/hybrid_sharding.py [--steps 4] [--hidden 256] [--layers 4]

Four local gloo ranks stand in for 2 nodes x 2 ranks: MiCS (``mics_shard_size: 2``) and hpZ
(``zero_hpz_partition_size: 2``) put ranks {0,1} and {2,3} in one group each, so "shard"
bytes would stay on a node and "world" / "replica" bytes would cross nodes
(docs/design.md, [Note: hybrid sharding]). Bytes are comm_stats(by_group=True)'s logical
payload per rank per step (exact, machine-independent); the step time is the median over
``--steps`` steps after one warm-up and, on one shared CPU machine where every "link" is
the same loopback, says nothing about a real inter-node link: it only shows the cost of the
extra work (hpZ's copy, MiCS's second collective). GPT-2 shaped, fp32, micro-batch 2 x 128.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYOUTS = {"plain stage 3": {}, "MiCS k=2, stage 3": {"mics_shard_size": 2},
           "hpZ k=2, stage 3": {"zero_hpz_partition_size": 2}, "plain stage 2": {"stage": 2},
           "MiCS k=2, stage 2": {"stage": 2, "mics_shard_size": 2}}


def run(rank: int, world: int, steps: int, hidden: int, layers: int) -> dict:
    import hf_zero
    from transformers import GPT2Config, GPT2LMHeadModel

    out = {}
    for name, extra in LAYOUTS.items():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, vocab_size=1024,
                                           n_positions=128, bos_token_id=0, eos_token_id=0))
        zero = {"stage": 3, "stage3_param_persistence_threshold": 0, **extra}
        engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero,
                                            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}})
        g = torch.Generator().manual_seed(rank)
        times = []
        for step in range(steps + 1):
            x = torch.randint(0, 1024, (2, 128), generator=g)
            if step == 1:
                engine.reset_comm_stats()
            start = time.perf_counter()
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
            if step >= 1:
                times.append(time.perf_counter() - start)
        model_bytes = 4 * sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        by_group = {g: sum(v["bytes"] for v in kinds.values()) / steps
                    for g, kinds in engine.comm_stats(by_group=True).items()}
        out[name] = {"by_group": by_group, "model_bytes": model_bytes, "step_s": statistics.median(times)}
        engine.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    from hf_zero.testing import run_on_ranks

    results = run_on_ranks(run, 4, args.steps, args.hidden, args.layers, timeout_s=900, threads=1)
    mib = 2**20
    print(f"model {results[0]['plain stage 3']['model_bytes'] / mib:.2f} MiB fp32; per rank per step (rank 0), "
          f"step time median of {args.steps} (max over ranks)")
    print("| layout | world (all ranks) MiB | replica (across groups) MiB | shard (in group) MiB | "
          "crossing groups MiB | step s |")
    print("|---|---|---|---|---|---|")
    for name in LAYOUTS:
        g = results[0][name]["by_group"]
        crossing = g.get("world", 0) + g.get("replica", 0)
        step = max(r[name]["step_s"] for r in results)
        print(f"| {name} | {g.get('world', 0) / mib:.2f} | {g.get('replica', 0) / mib:.2f} | "
              f"{g.get('shard', 0) / mib:.2f} | {crossing / mib:.2f} | {step:.3f} |")


if __name__ == "__main__":
    main()
