"""Checkpoint save/load throughput against this filesystem, and consolidation's peak memory.

    python benchmarks/checkpoint.py [--size 100M] [--dir /tmp/hf_zero_ckpt_bench]

1. Sequential bandwidth of the filesystem holding --dir: write 1 GiB in 8 MiB blocks with
   fsync, then read it back after evicting it from the page cache (posix_fadvise DONTNEED).
2. A GPT-2 of --size trained one step at world size 2, ZeRO stage 2, fp32; save_checkpoint
   and load_checkpoint (checksums verified; page cache evicted before loading) timed on
   both ranks; throughput = checkpoint bytes / slowest rank's time.
3. ``hf-zero consolidate`` in a fresh process with --max-shard-size = 1/5 of the fp32 model:
   peak RSS (ru_maxrss) minus the RSS after imports, against (shard size + largest tensor).
4. With --deepspeed-python: DeepSpeed's zero_to_fp32 on an equivalent DeepSpeed ZeRO-2
   checkpoint of the same model, same shard size, measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_zero.testing import run_on_ranks  # noqa: E402

BLOCK = 8 << 20


def evict(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bandwidth(directory: Path, total: int = 1 << 30) -> tuple[float, float]:
    path = directory / "bandwidth.bin"
    block = os.urandom(BLOCK)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(total // BLOCK):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = total / (time.perf_counter() - start)
    evict(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(BLOCK):
            pass
    read = total / (time.perf_counter() - start)
    path.unlink()
    return write, read


def save_and_load(rank: int, world: int, size: str, directory: str) -> dict:
    import torch.distributed as dist

    import hf_zero
    from zero_stages import MICRO, SEQ, build_model

    model = build_model(size)
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": MICRO,
                                        "optimizer": {"params": {"lr": 1e-4}},
                                        "zero_optimization": {"stage": 2, "reduce_bucket_size": 6_553_600}})
    x = __import__("torch").randint(0, model.config.vocab_size, (MICRO, SEQ))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    dist.barrier()
    start = time.perf_counter()
    path = engine.save_checkpoint(directory, tag="bench")
    save_s = time.perf_counter() - start
    if rank == 0:
        evict(path)
    dist.barrier()
    start = time.perf_counter()
    engine.load_checkpoint(directory, tag="bench")
    load_s = time.perf_counter() - start
    nbytes = sum(f.stat().st_size for f in path.iterdir())
    return {"save_s": save_s, "load_s": load_s, "bytes": nbytes,
            "largest": max(p.numel() for p in model.parameters()) * 4,
            "model_bytes": sum(p.numel() for p in model.parameters()) * 4}


CONSOLIDATE = """
import resource, sys, hf_zero, torch, huggingface_hub, safetensors
import transformers.models.gpt2.modeling_gpt2   # consolidation builds the model class on meta (no tensors)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hf_zero.consolidate(sys.argv[1], sys.argv[2], max_shard_size=int(sys.argv[3]))
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


DEEPSPEED_CONSOLIDATE = """
import resource, sys
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# safe_serialization=True fails on GPT-2's tied embeddings ("tensors share memory"): .bin it is
convert_zero_checkpoint_to_fp32_state_dict(sys.argv[1], sys.argv[2], tag="bench", max_shard_size=sys.argv[3] + "MB",
                                           safe_serialization=False)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def deepspeed_side_by_side(python: str, size: str, directory: Path, shard: int) -> str:
    """zero_to_fp32 on an equivalent DeepSpeed ZeRO-2 checkpoint, in DeepSpeed's own Python."""
    torchrun = str(Path(python).with_name("torchrun"))
    env = dict(os.environ, DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", HF_HUB_OFFLINE="1")
    helper = Path(__file__).with_name("_deepspeed_checkpoint.py")
    subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(helper), size, str(directory / "ds")],
                   check=True, env=env, capture_output=True, text=True)
    out = subprocess.run([python, "-c", DEEPSPEED_CONSOLIDATE, str(directory / "ds"), str(directory / "ds-hf"),
                          str(round(shard / 1e6))], check=True, env=env, capture_output=True, text=True)
    base_kb, peak_kb = map(int, out.stdout.split()[-2:])
    return (f"DeepSpeed zero_to_fp32 on the equivalent ZeRO-2 checkpoint: peak RSS {peak_kb / 1024:.0f} MiB; "
            f"after imports {base_kb / 1024:.0f} MiB; growth {(peak_kb - base_kb) / 1024:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100M")
    parser.add_argument("--dir", default="/tmp/hf_zero_ckpt_bench")
    parser.add_argument("--deepspeed-python", default="",
                        help="a Python with DeepSpeed installed, for the zero_to_fp32 side-by-side")
    args = parser.parse_args()
    directory = Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)

    write_bw, read_bw = disk_bandwidth(directory)
    ranks = run_on_ranks(save_and_load, 2, args.size, str(directory), timeout_s=1800)
    nbytes = ranks[0]["bytes"]
    save_s = max(r["save_s"] for r in ranks)
    load_s = max(r["load_s"] for r in ranks)

    shard = ranks[0]["model_bytes"] // 5
    out = subprocess.run([sys.executable, "-c", CONSOLIDATE, str(directory), str(directory / "hf"), str(shard)],
                         capture_output=True, text=True, check=True)
    base_kb, peak_kb = map(int, out.stdout.split())
    delta = (peak_kb - base_kb) * 1024
    budget = shard + ranks[0]["largest"]
    num_shards = len(json.loads((directory / "hf" / "model.safetensors.index.json").read_text())["weight_map"])

    mb = 1 << 20
    print(f"filesystem: sequential write {write_bw / 1e9:.2f} GB/s, read {read_bw / 1e9:.2f} GB/s (1 GiB, fsync / "
          "page cache evicted)")
    print("| operation | bytes | seconds | GB/s | / filesystem |")
    print("|---|---|---|---|---|")
    print(f"| save_checkpoint (2 ranks, stage 2, fp32 {args.size}) | {nbytes / mb:.0f} MiB | {save_s:.2f} | "
          f"{nbytes / save_s / 1e9:.2f} | {nbytes / save_s / write_bw:.2f} of write |")
    print(f"| load_checkpoint (checksums verified) | {nbytes / mb:.0f} MiB | {load_s:.2f} | "
          f"{nbytes / load_s / 1e9:.2f} | {nbytes / load_s / read_bw:.2f} of read |")
    print(f"consolidate: {ranks[0]['model_bytes'] / mb:.0f} MiB of fp32 weights, --max-shard-size {shard / mb:.0f} MiB "
          f"({num_shards} tensors), largest tensor {ranks[0]['largest'] / mb:.0f} MiB")
    print(f"consolidate peak RSS {peak_kb / 1024:.0f} MiB; after imports {base_kb / 1024:.0f} MiB; growth "
          f"{delta / mb:.0f} MiB = {delta / budget:.2f} x (shard + largest tensor = {budget / mb:.0f} MiB)")
    if args.deepspeed_python:
        print(deepspeed_side_by_side(args.deepspeed_python, args.size, directory, shard))
    else:
        print("DeepSpeed side-by-side skipped (pass --deepspeed-python PATH to a Python with DeepSpeed)")
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
