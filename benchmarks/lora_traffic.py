"""Bytes communicated per step under stage 3: full fine-tuning vs LoRA (frozen base).

    python benchmarks/lora_traffic.py [--steps 3]

World size 2 on gloo, the demo's GPT-2 (n_embd 256, 4 layers, byte vocabulary) with and
without LoRA (r=8 on c_attn and c_proj), fp32, micro-batch 4, seq 64. Bytes per step from
``engine.comm_stats()`` after one warm-up step (see hf_zero/comm.py for how each collective
is counted). "frozen base" is the LoRA run's traffic minus that of the same run with
``stage3_persist_frozen_params`` (which leaves only the adapters' own traffic).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_zero  # noqa: E402
from hf_zero.testing import run_on_ranks  # noqa: E402

MICRO, SEQ = 4, 64


def _measure(rank: int, world: int, lora: bool, steps: int, persist_frozen: bool = False) -> dict:
    from hf_zero.checkpoint.layout import true_numel
    from hf_zero.demo.__main__ import build_model

    model = build_model(rank) if lora else build_model(rank).base_model.model
    if not lora:
        for p in model.parameters():   # peft froze the base; full fine-tuning trains it all
            p.requires_grad_(True)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": 2_000_000,
                                    # 0: adapters are plain sharded parameters, so their own traffic
                                    # is exactly 3x their bytes and the rest is the frozen base's
                                    "stage3_param_persistence_threshold": 0,
                                    "stage3_persist_frozen_params": persist_frozen}}
    engine = hf_zero.initialize(model, config)
    g = torch.Generator().manual_seed(rank)
    for step in range(steps + 1):
        if step == 1:
            engine.reset_comm_stats()   # step 0 is warm-up
        x = torch.randint(0, 256, (MICRO, SEQ), generator=g)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    trainable = sum(true_numel(p) for grp in engine.flat_groups for p in grp.params)
    total = sum(true_numel(p) for p in model.parameters())
    stats = engine.comm_stats()
    mem = engine.memory_breakdown()
    return {"per_step": {k: v["bytes"] / steps for k, v in stats.items()},
            "trainable_bytes": 4 * trainable, "frozen_bytes": 4 * (total - trainable),
            "param_bytes": mem["params"] + mem["persistent_params"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for name, lora, persist in (("full fine-tuning", False, False), ("LoRA, frozen base sharded", True, False),
                                ("LoRA, stage3_persist_frozen_params", True, True)):
        result = run_on_ranks(_measure, 2, lora, args.steps, persist)[0]
        per_step = sum(result["per_step"].values())
        rows.append((name, result, per_step))
    print("| stage 3, world 2, fp32 | trainable MB | frozen MB | bytes/step (by collective) | MB/step | "
          "/ trainable bytes | frozen-base MB/step | parameter MB/rank at rest |")
    print("|---|---|---|---|---|---|---|---|")
    adapters_only = rows[2][2]   # frozen base persisted: what remains is the adapters' own traffic
    for name, result, per_step in rows:
        kinds = ", ".join(f"{k} {v / 2**20:.2f} MB" for k, v in result["per_step"].items())
        frozen = f"{(per_step - adapters_only) / 2**20:.3f}" if result["frozen_bytes"] else "-"
        print(f"| {name} | {result['trainable_bytes'] / 2**20:.2f} | {result['frozen_bytes'] / 2**20:.2f} | {kinds} | "
              f"{per_step / 2**20:.2f} | {per_step / result['trainable_bytes']:.2f} | {frozen} | "
              f"{result['param_bytes'] / 2**20:.2f} |")

if __name__ == "__main__":
    main()
