"""Stage-3 parameter offload: step time and memory with shards in RAM or on NVMe, warm or cold.

    python benchmarks/param_offload.py [--billions 0.5] [--steps 3] [--rounds 2] [--swap-dir /tmp]

A Llama-shaped model (bf16, built under ``hf_zero.zero_init``) trains at stage 3 on 2 gloo
processes with the optimizer on the CPU, and ``offload_param`` as each column says:

- ``none``: shards in RAM;
- ``nvme warm``: shards in mapped files (docs/param_offload.md), page cache left alone;
- ``nvme cold``: before every step each rank writes its dirty shard pages and drops the
  files' pages from the page cache (``fsync`` + ``POSIX_FADV_DONTNEED``), so every shard
  read of that step comes from the disk; with read-ahead along the prefetch order
  (``buffer_count`` x ``buffer_size`` = 5e8 elements);
- ``nvme cold, no read-ahead``: the same with a read-ahead budget of one element.

Each variant runs in its own 2-process group, variants interleaved ``--rounds`` times; the
table gives the median step time over steps 2.. (the first step records the prefetch
order) with its min-max over rounds, and rank 0's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("none", "nvme warm", "nvme cold", "nvme cold, no read-ahead")


def drop_shard_cache(engine) -> None:
    """Write this rank's dirty shard pages and drop the swap files from the page cache."""
    for storage in engine.param_store.storages:
        if storage.offloaded:
            fd = os.open(storage.path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def trial(rank: int, world: int, billions: float, variant: str, swap: str, steps: int) -> dict:
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_zero
    from largest_model import llama_shape

    shape = llama_shape(billions)
    with hf_zero.zero_init(seed=0):
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    num_params = sum(p.numel() for p in model.parameters())
    param = {"device": "none"}
    if variant != "none":
        param = {"device": "nvme", "nvme_path": swap, "max_in_cpu": 0, "buffer_count": 5, "buffer_size": 100_000_000}
        if variant.endswith("no read-ahead"):
            param.update(buffer_count=1, buffer_size=1)
    engine = hf_zero.initialize(model, {
        "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "zero_optimization": {"stage": 3, "sub_group_size": 10_000_000, "reduce_bucket_size": 50_000_000,
                              "allgather_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                              "offload_optimizer": {"device": "cpu"}, "offload_param": param}})
    ids = torch.randint(0, shape["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(rank))
    times = []
    for _ in range(steps):
        if variant.startswith("nvme cold"):
            drop_shard_cache(engine)
        torch.distributed.barrier()
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
    mem = engine.memory_breakdown()
    engine.destroy(unshard=False)
    return {"times": times, "loss": loss.item(), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 2 ** 20, "param_nvme_gib": mem["param_nvme"] / 2 ** 30,
            "num_params": num_params}


def run_variant(billions: float, variant: str, swap: str, steps: int) -> dict:
    code = ("import sys, json; sys.path.insert(0, %r); sys.path.insert(0, %r); import param_offload as po; "
            "from hf_zero.testing import run_on_ranks; "
            "print('RESULT', json.dumps(run_on_ranks(po.trial, 2, %r, %r, %r, %d, timeout_s=3600)))"
            ) % (str(ROOT), str(ROOT / "benchmarks"), billions, variant, swap, steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{variant}: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[0][7:])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--billions", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--swap-dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            results[variant].append(run_variant(args.billions, variant, args.swap_dir, args.steps))
    first = results["none"][0]
    print(f"Llama {first['num_params'] / 1e9:.2f}B, bf16, stage 3, 2 ranks, optimizer on CPU, "
          f"{args.rounds} rounds x {args.steps} steps\n")
    print("| offload_param | step s (median) | min-max over rounds | x none | rank-0 peak RSS GiB | "
          "shard files per rank GiB | loss |\n|---|---|---|---|---|---|---|")
    base = None
    for variant in VARIANTS:
        medians = [statistics.median(r["times"][1:] or r["times"]) for r in results[variant]]
        median = statistics.median(medians)
        base = base or median
        r = results[variant][-1]
        print(f"| {variant} | {median:.2f} | {min(medians):.2f}-{max(medians):.2f} | {median / base:.2f} | "
              f"{max(x['peak_rss_gib'] for x in results[variant]):.2f} | {r['param_nvme_gib']:.2f} | "
              f"{r['loss']:.4f} |")


if __name__ == "__main__":
    main()
