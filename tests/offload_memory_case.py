"""One training run of a ~100M-parameter model in its own process; prints its peak RSS.

Run by test_offload_local.py as ``python offload_memory_case.py DEVICE SWAP_DIR`` (one
process per device, since peak RSS only grows within a process) and by benchmarks/offload.py.
fp32, stage 1, one rank, two steps, tiny activations: the model states dominate memory.
Optional further arguments: steps, sub_group_size, rows per batch, fold (0: the CPU update
always makes the separate unscale/clip multiply pass, [Note: folding the coefficient]).
Besides step times it reports the time spent in the offload backend's update per step.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import hf_zero

WIDTH, DEPTH = 2048, 24   # 24 x 2048 x 2048 = 100.7M parameters


def peak_rss_bytes() -> int:
    """This process's resident high-water mark. Not getrusage's ru_maxrss: Linux carries that
    over from the parent across fork + exec, so a child of a big process would report the
    parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH, bias=False), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def run(device: str, swap: str, steps: int = 2, sub_group_size: int = 5_000_000, rows: int = 4,
        fold: int = 1) -> dict:
    net = model()
    num_params = sum(p.numel() for p in net.parameters())
    engine = hf_zero.initialize(net, {
        "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 1, "sub_group_size": sub_group_size,
                              "offload_optimizer": {"device": device, "nvme_path": swap, "buffer_count": 2}}})
    offload = engine.optimizer.offload
    offload.fold_coefficient = bool(fold)
    update_times: list[float] = []
    backend_step = offload.step

    def timed_update(grads, coefficient, *overflow):
        start = time.perf_counter()
        backend_step(grads, coefficient, *overflow)
        update_times.append(time.perf_counter() - start)

    offload.step = timed_update   # the whole update: gradient pass, Adam, write-back
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, WIDTH, generator=g)
    losses, times, opt_times, norms = [], [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        before_step = time.perf_counter()
        engine.step()
        opt_times.append(time.perf_counter() - before_step)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        norms.append(engine.optimizer.last_grad_norm)
    mem = engine.memory_breakdown()
    engine.destroy()
    return {"device": device, "num_params": num_params, "losses": losses, "step_s": times, "optimizer_s": opt_times,
            "update_s": update_times, "grad_norms": norms,
            "peak_rss_bytes": peak_rss_bytes(),
            "optimizer_state_bytes": 8 * num_params, "memory": mem}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))))
