"""The largest Llama-shaped model that completes a full training step on this machine.

    python benchmarks/largest_model.py --swap-dir /local_nvme [--sizes 0.5,1,2,3,4] [--ram-budget-gib 22]
        [--offload nvme|cpu|none] [--offload-param nvme|cpu|none]

Each trial builds a Llama (bf16 compute, fp32 masters and Adam states) from its config
under ``hf_zero.zero_init`` (meta device: no rank ever holds the whole model; each rank
materialises one block at a time and keeps its shard), shards it under ZeRO stage 3 on 2
gloo processes with the optimizer state offloaded as ``--offload`` says and the parameter
shards as ``--offload-param`` says (nvme for both by default; cpu; none), and runs one full step
(forward, backward, optimizer; with activation checkpointing unless
``--no-activation-checkpointing``) on a short sequence. Trials
go up the ``--sizes`` list (billions of parameters; the shape is scaled like Llama:
hidden h, 2.7h MLP, h/128 heads, layers from the size) and stop at the first failure. A
watchdog kills a trial whose processes together exceed ``--ram-budget-gib`` of resident
memory (so the machine's OOM killer never has to choose), which counts as a failure.

With both on NVMe, what stays in RAM is the bf16 gradient shards (2 bytes per parameter
over the 2 ranks), the gathered blocks, activations and the swap buffers; those and the
free disk space (12 bytes per parameter of optimizer state plus 2 of parameters) bound the
size here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def llama_shape(billions: float) -> dict:
    """A Llama-proportioned config with about ``billions`` x 1e9 parameters."""
    hidden = 2048 if billions < 1.5 else 2560 if billions < 3 else 3072 if billions < 5 else 4096
    inter = int(2.6875 * hidden) // 256 * 256
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    vocab = 32000
    layers = max(1, round((billions * 1e9 - 2 * vocab * hidden) / per_layer))
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128, "vocab_size": vocab,
            "max_position_embeddings": 256}


def _rss_gib(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or its peak so far (VmHWM), GiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20


def trial(rank: int, world: int, shape: dict, swap: str, seq: int, offload: str = "nvme",
          offload_param: str = "none", checkpointing: bool = True) -> dict:
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_zero

    with hf_zero.zero_init(seed=0):
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    num_params = sum(p.numel() for p in model.parameters())
    offload_block = {"device": offload}
    if offload == "nvme":
        offload_block.update(nvme_path=swap, buffer_count=2)
    param_block = {"device": offload_param, "max_in_cpu": 0}
    if offload_param == "nvme":
        param_block.update(nvme_path=swap)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = hf_zero.initialize(model, {
        "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "zero_optimization": {"stage": 3, "sub_group_size": 10_000_000, "reduce_bucket_size": 50_000_000,
                              "allgather_bucket_size": 50_000_000,
                              "offload_optimizer": offload_block, "offload_param": param_block}})
    ids = torch.randint(0, shape["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(rank))
    phases = {"init peak": _rss_gib("VmHWM"), "init": _rss_gib()}
    start = time.perf_counter()
    loss = engine(input_ids=ids, labels=ids).loss
    phases["forward"] = _rss_gib()
    engine.backward(loss)
    phases["backward"] = _rss_gib()
    engine.step()
    phases["step"] = _rss_gib()
    phases["step peak"] = _rss_gib("VmHWM")
    step_s = time.perf_counter() - start
    mem = engine.memory_breakdown()
    engine.destroy(unshard=False)   # whole parameters on every rank would not fit
    return {"num_params": num_params, "loss": loss.item(), "step_s": step_s, "phases": phases,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "offload_nvme_gib": (mem.get("offload_nvme", 0) + mem.get("param_nvme", 0)) / 2 ** 30}


def run_trial(billions: float, swap: str, seq: int, budget_gib: float, timeout_s: float, offload: str,
              offload_param: str, checkpointing: bool = True) -> dict:
    """One trial in a child process (2 ranks), killed if the ranks' RSS exceeds the budget."""
    import psutil

    code = ("import sys, json; sys.path.insert(0, %r); sys.path.insert(0, %r); import largest_model as lm; "
            "from hf_zero.testing import run_on_ranks; "
            "print('RESULT', json.dumps(run_on_ranks(lm.trial, 2, lm.llama_shape(%r), %r, %d, %r, %r, %r, "
            "timeout_s=%r)))"
            ) % (str(ROOT), str(ROOT / "benchmarks"), billions, swap, seq, offload, offload_param, checkpointing,
                 timeout_s)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    parent, peak = psutil.Process(child.pid), 0.0
    per_process: dict[str, float] = {}
    while child.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            sizes = {f"{p.pid} {' '.join(p.cmdline())[-60:]}": p.memory_info().rss / 2 ** 30 for p in procs}
        except psutil.Error:
            sizes = {}
        rss = sum(sizes.values())
        if rss > peak:
            peak, per_process = rss, sizes
        if rss > budget_gib:
            for p in parent.children(recursive=True):
                p.kill()
            child.kill()
            child.wait()
            return {"ok": False, "why": f"over the RAM budget ({rss:.1f} > {budget_gib} GiB)", "peak_gib": peak,
                    "per_process": per_process}
        time.sleep(0.5)
    out, err = child.communicate()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        return {"ok": False, "why": (err.strip().splitlines() or ["?"])[-1][:200], "peak_gib": peak}
    return {"ok": True, "ranks": json.loads(lines[0][7:]), "peak_gib": peak, "per_process": per_process}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--swap-dir", default=tempfile.gettempdir())
    parser.add_argument("--sizes", default="0.5,1,2,3,4", help="billions of parameters, ascending")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--ram-budget-gib", type=float, default=22.0)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--offload", choices=("nvme", "cpu", "none"), default="nvme")
    parser.add_argument("--offload-param", choices=("nvme", "cpu", "none"), default="nvme")
    parser.add_argument("--no-activation-checkpointing", dest="checkpointing", action="store_false",
                        help="keep every block's activations (and whatever the blocks save for backward)")
    args = parser.parse_args()
    print(f"offload_optimizer: {args.offload}; offload_param: {args.offload_param}; stage 3, 2 processes, bf16, "
          f"seq {args.seq}, zero_init, activation checkpointing {'on' if args.checkpointing else 'off'}")
    print("| target B | params B | result | step s | peak RSS (both ranks) GiB | rank-0 RSS after init, forward, "
          "backward, step GiB | NVMe per rank GiB |\n|---|---|---|---|---|---|---|")
    best = None
    for billions in (float(s) for s in args.sizes.split(",")):
        r = run_trial(billions, args.swap_dir, args.seq, args.ram_budget_gib, args.timeout_s, args.offload,
                      args.offload_param, args.checkpointing)
        if not r["ok"]:
            print(f"| {billions} | - | failed: {r['why']} | - | {r['peak_gib']:.1f} | - | - |", flush=True)
            break
        r0 = r["ranks"][0]
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r0["phases"].items())
        print(f"| {billions} | {r0['num_params'] / 1e9:.2f} | ok (loss {r0['loss']:.3f}) | {r0['step_s']:.1f} | "
              f"{r['peak_gib']:.1f} | {phases} | {r0['offload_nvme_gib']:.1f} |", flush=True)
        best = r0["num_params"]
        if os.environ.get("HF_ZERO_BENCH_VERBOSE"):
            print("  RSS at the peak, per process (GiB):", {k: round(v, 2) for k, v in r["per_process"].items()})
    print(f"\nlargest model that completed a step: {best / 1e9:.2f} B parameters" if best else "\nno size completed")


if __name__ == "__main__":
    main()
