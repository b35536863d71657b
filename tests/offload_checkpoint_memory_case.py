"""Peak RSS growth while saving and loading a checkpoint of NVMe-offloaded optimizer state.

Run by test_offload_local.py as ``python offload_checkpoint_memory_case.py DEVICE SWAP_DIR CKPT_DIR``
(its own process: the peak is this process's ``VmHWM``, reset before each phase through
``/proc/self/clear_refs``). The model is offload_memory_case.py's 100.7M-parameter fp32
stack, stage 1, one rank, after one step; its Adam moments (8 bytes per parameter) live in
swap files, the swap buffers hold two sub-groups of ``sub_group_size`` elements. Prints one
JSON line: the state size, the buffer size, the growth of peak RSS over the RSS before each
phase, each phase's seconds, and whether the loaded engine continues exactly like the one
that saved (two more steps: the second loss depends on the loaded Adam moments).
"""

from __future__ import annotations

import json
import sys
import time

import torch

import hf_zero
from offload_memory_case import WIDTH, model


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset this process's resident high-water mark to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS:")


def _engine(device: str, swap: str, sub_group_size: int):
    return hf_zero.initialize(model(), {
        "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 1, "sub_group_size": sub_group_size,
                              "offload_optimizer": {"device": device, "nvme_path": swap, "buffer_count": 2}}})


def _step(engine, x: torch.Tensor) -> float:
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def run(device: str, swap: str, ckpt: str, sub_group_size: int = 5_000_000) -> dict:
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(0))
    engine = _engine(device, swap, sub_group_size)
    num_params = sum(p.numel() for p in engine.module.parameters())
    _step(engine, x)
    before, start = _reset_peak(), time.perf_counter()
    engine.save_checkpoint(ckpt, tag="t")
    save_s, save_growth = time.perf_counter() - start, _status_bytes("VmHWM:") - before
    expected = [_step(engine, x), _step(engine, x)]   # the second loss depends on the Adam moments
    before, start = _reset_peak(), time.perf_counter()
    engine.load_checkpoint(ckpt, tag="t")
    load_s, load_growth = time.perf_counter() - start, _status_bytes("VmHWM:") - before
    resumed = [_step(engine, x), _step(engine, x)]
    mem = engine.memory_breakdown()
    engine.destroy()
    return {"device": device, "num_params": num_params, "optimizer_state_bytes": 8 * num_params,
            "offload_buffer_bytes": mem["offload_buffers"], "save_rss_growth_bytes": save_growth,
            "load_rss_growth_bytes": load_growth, "save_s": save_s, "load_s": load_s,
            "resumed_exactly": resumed == expected}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))))
