"""What stage 3 really holds during a step: measured parameter bytes and resident memory.

    python benchmarks/stage3_memory.py [--model small|8x1024] [--parts params,rss] [--steps 3]

Llama-shaped model from a config (untied embeddings, no activation checkpointing), world
size 2 on gloo, micro-batch 2, sequence 256.

Part ``params``: peak bytes of *gathered parameter storage* allocated during forward and
backward, measured, not counted: every storage that held a parameter while a module ran is
recorded (a forward pre-hook; both engines keep one storage per gathered buffer and free
it in place, diagnostics/saved_tensors.py), and at each sample point (every module's
forward end and the start of every module's backward) the ``nbytes()`` those storages hold
now are summed: in use, kept for backward, or gathered ahead by prefetch alike. hf_zero
stage 3 (prefetch 0, persistence 0, as the issue measured; and its defaults) against
FSDP2 (``fully_shard`` per decoder layer and the root), fp32 and bf16
(FSDP2: ``MixedPrecisionPolicy(param_dtype=bf16)``).

Part ``rss``: resident memory per rank sampled every millisecond by a thread during the
last step, by phase (forward, backward, optimizer step), as growth over the resident
memory just before that step, and the peak. DDP (bucket_cap_mb 25), hf_zero stages 0-3
with the default bucket sizes (25 MiB of fp32 for reduce / all-gather buckets), with
DeepSpeed's 5e8-element buckets (``_5e8``), stage 3 with a 25 MiB prefetch too (``_25mb``),
and FSDP2. glibc's dynamic mmap
threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so freed large buffers leave RSS at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_zero  # noqa: E402
from hf_zero.diagnostics.saved_tensors import ParameterStorageRecorder  # noqa: E402
from hf_zero.testing import run_on_ranks  # noqa: E402

MICRO, SEQ = 2, 256
MODELS = {"small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8),
          "8x1024": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=8)}
BUCKET_25MB = 25 * 2**20 // 4   # elements of fp32 in DDP's default bucket


def build(model_name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = MODELS[model_name]
    return LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], vocab_size=32000,
                                        max_position_embeddings=SEQ, tie_word_embeddings=False))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 32000, (MICRO, SEQ), generator=torch.Generator().manual_seed(100 * step + rank))


def _fsdp2(model, bf16: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _hf_zero(model, stage: int, bf16: bool, zero: dict):
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": MICRO, "bf16": {"enabled": bf16},
                                        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                                        "zero_optimization": {"stage": stage, **zero}})
    return engine, engine


class _ParamBytesProbe:
    """Peak bytes held by parameter storages, sampled at every module's forward end and
    backward start (see the module docstring)."""

    def __init__(self, model):
        self.recorder, self.peak = ParameterStorageRecorder(model, keep=True), 0
        self._handles = [m.register_forward_hook(self._after_forward) for m in model.modules()
                         if any(True for _ in m.parameters(recurse=False))]

    def _sample(self) -> None:
        self.peak = max(self.peak, self.recorder.allocated_bytes())

    def _after_forward(self, module, args, output) -> None:
        self._sample()
        for t in (output if isinstance(output, tuple) else (output,)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad: (self._sample(), grad)[1])


def param_bytes(rank: int, world: int, model_name: str, system: str, bf16: bool, steps: int) -> dict:
    model = build(model_name)
    whole = sum(p.numel() for p in model.parameters()) * (2 if bf16 else 4)
    if system == "fsdp2":
        forward, opt = _fsdp2(model, bf16)
        backward = torch.Tensor.backward
    else:
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        zero = {"zero3_issue_knobs": {"stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 0},
                # FSDP2's settings: one layer gathered ahead, nothing persistent
                "zero3_one_ahead": {"stage3_prefetch_bucket_size": layer, "stage3_param_persistence_threshold": 0},
                }.get(system, {})
        forward, opt = _hf_zero(model, 3, bf16, zero)
        backward = forward.backward
    probe = _ParamBytesProbe(model)
    for step in range(steps):
        probe.peak = 0
        x = _batch(rank, step)
        loss = forward(input_ids=x, labels=x).loss
        backward(loss)
        opt.step()
        opt.zero_grad()
    return {"peak": probe.peak, "whole": whole, "shard": whole / world}


class _RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.phase, self.peaks, self._done = None, {}, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def run(self) -> None:
        while not self._done.is_set():
            phase = self.phase
            if phase is not None:
                self.peaks[phase] = max(self.peaks.get(phase, 0), self.rss())
            time.sleep(0.001)

    def stop(self) -> None:
        self._done.set()
        self.join()


def rss(rank: int, world: int, model_name: str, system: str, steps: int) -> dict:
    model = build(model_name)
    if system == "ddp":
        ddp = DDP(model, bucket_cap_mb=25)
        forward, opt, backward = ddp, torch.optim.AdamW(model.parameters(), lr=1e-4), torch.Tensor.backward
    elif system == "fsdp2":
        (forward, opt), backward = _fsdp2(model, False), torch.Tensor.backward
    else:   # zero<stage>[_25mb|_5e8]
        stage = int(system[4])
        zero = {"reduce_bucket_size": BUCKET_25MB, "allgather_bucket_size": BUCKET_25MB,
                "stage3_prefetch_bucket_size": BUCKET_25MB} if system.endswith("25mb") else {}
        if system.endswith("5e8"):   # DeepSpeed's defaults (and hf_zero's before 2026-12-01)
            zero = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
        forward, opt = _hf_zero(model, stage, False, zero)
        backward = forward.backward
    sampler = _RssSampler()
    sampler.start()
    for step in range(steps):
        last = step == steps - 1
        before = sampler.rss()
        x = _batch(rank, step)
        sampler.phase = "forward" if last else None
        loss = forward(input_ids=x, labels=x).loss
        sampler.phase = "backward" if last else None
        backward(loss)
        sampler.phase = "step" if last else None
        opt.step()
        opt.zero_grad()
        sampler.phase = None
    sampler.stop()
    return {"before": before, **sampler.peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", choices=sorted(MODELS))
    parser.add_argument("--parts", default="params,rss")
    parser.add_argument("--param-systems", default="zero3_issue_knobs,zero3_one_ahead,zero3,fsdp2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--systems", default="ddp,zero0,zero1,zero2,zero3,zero1_5e8,zero2_5e8,zero3_5e8,"
                                             "zero3_25mb,fsdp2")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)   # inherited by the spawned ranks
    mb = 1e6
    if "params" in args.parts:
        print(f"Peak gathered-parameter bytes allocated during forward+backward, Llama {args.model}, world 2")
        print("| system | dtype | peak MB | / one rank's shard | / whole model |\n|---|---|---|---|---|")
        for bf16 in (False, True):
            for system in args.param_systems.split(","):
                r = run_on_ranks(param_bytes, 2, args.model, system, bf16, args.steps, timeout_s=1800)[0]
                print(f"| {system} | {'bf16' if bf16 else 'fp32'} | {r['peak'] / mb:.2f} | "
                      f"{r['peak'] / r['shard']:.2f} | {r['peak'] / r['whole']:.3f} |", flush=True)
    if "rss" in args.parts:
        print(f"\nResident memory per rank during step {args.steps} (MB; growth over the RSS before it), "
              f"Llama {args.model}, fp32, world 2")
        print("| system | before | forward + | backward + | step + | peak |\n|---|---|---|---|---|---|")
        for system in args.systems.split(","):
            per_rank = run_on_ranks(rss, 2, args.model, system, args.steps, timeout_s=1800)
            cells = [max(r["before"] for r in per_rank) / mb]
            cells += [max(r.get(k, 0) - r["before"] for r in per_rank) / mb for k in ("forward", "backward", "step")]
            cells.append(max(max(r.get(k, 0) for k in ("forward", "backward", "step")) for r in per_rank) / mb)
            print(f"| {system} | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
