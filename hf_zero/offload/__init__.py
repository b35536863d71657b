"""Optimizer-state offload: one protocol (protocol.py), three backends (none, cpu, nvme).

``build_optimizer_offload`` is the only place that picks a backend from the config; see
[Note: offload backends] in protocol.py and docs/offload.md.
"""

from __future__ import annotations

import torch

from hf_zero.config.schema import ZeroConfig
from hf_zero.offload.protocol import NoOffload, OptimizerOffload
from hf_zero.offload.swap_dir import SwapSetupError
from hf_zero.offload.swapper import SwapIOError


def build_optimizer_offload(zero: ZeroConfig, owned_params: list[list[torch.Tensor]], rank: int,
                            force_copy: bool = False) -> OptimizerOffload:
    """The backend for ``zero.offload_optimizer.device``, holding the masters of ``owned_params``
    (per group, per bucket: this rank's 1D chunks). Call ``attach(inner)`` once the inner
    optimizer over ``backend.masters.masters`` exists."""
    cfg = zero.offload_optimizer
    if cfg.device == "cpu":
        from hf_zero.offload.cpu import CpuOffload

        return CpuOffload(owned_params, zero.sub_group_size, cfg.pin_memory, force_copy=force_copy)
    if cfg.device == "nvme":
        from hf_zero.offload.nvme import NvmeOffload

        return NvmeOffload(owned_params, zero.sub_group_size, cfg.nvme_path, cfg.buffer_count, cfg.pin_memory,
                           rank, force_copy=force_copy)
    return NoOffload(owned_params, force_copy=force_copy)


__all__ = ["OptimizerOffload", "SwapIOError", "SwapSetupError", "build_optimizer_offload"]
