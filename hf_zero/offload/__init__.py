"""Offload: optimizer state (one protocol, protocol.py; backends none, cpu, nvme) and stage-3
parameter shards (param_store.py).

``build_optimizer_offload`` and ``build_param_store`` are the only places that read the
offload devices from the config; see [Note: offload backends] in protocol.py,
[Note: parameter offload] in param_store.py, docs/offload.md and docs/param_offload.md.
"""

from __future__ import annotations

import logging

import torch

from hf_zero.config.parse import ConfigError
from hf_zero.config.schema import ZeroConfig
from hf_zero.offload.param_store import ParamStore
from hf_zero.offload.protocol import NoOffload, OptimizerOffload
from hf_zero.offload.swap_dir import SwapSetupError
from hf_zero.offload.swapper import SwapIOError

logger = logging.getLogger(__name__)


def _warn_unhonoured_ratio(zero: ZeroConfig) -> None:
    """``offload_optimizer.ratio`` < 1 where it cannot mean what it says (said, not ignored)."""
    ratio, device = zero.offload_optimizer.ratio, zero.offload_optimizer.device
    if ratio < 1 and device == "none":
        logger.warning("zero_optimization.offload_optimizer.ratio=%s has no effect: offload_optimizer.device is "
                       "'none', so the whole optimizer state stays on the device", ratio)
    elif ratio < 1 and zero.offload_param.device != "none":
        logger.warning("zero_optimization.offload_optimizer.ratio=%s with offload_param.device=%r: the sub-groups "
                       "kept 'on the device' live where the parameter shards live, in host memory, not on the "
                       "accelerator", ratio, zero.offload_param.device)


def build_optimizer_offload(zero: ZeroConfig, owned_params: list[list[torch.Tensor]], rank: int,
                            force_copy: bool = False, on_params_done=None) -> OptimizerOffload:
    """The backend for ``zero.offload_optimizer.device``, holding the masters of ``owned_params``
    (per group, per bucket: this rank's 1D chunks). Call ``attach(inner)`` once the inner
    optimizer over ``backend.masters.masters`` exists. ``on_params_done``: see
    ``OptimizerOffload.on_params_done`` (the in-memory backend has no sub-groups to call it for).
    ``offload_optimizer.ratio`` < 1 keeps the first sub-groups on the device ([Note: partial
    offload] in partial.py); with device 'none' nothing is offloaded and it has no effect."""
    cfg = zero.offload_optimizer
    _warn_unhonoured_ratio(zero)
    # 0 is DeepSpeed's "one parameter per sub-group"; the closest here is one chunk's worth.
    sub_group_size = zero.sub_group_size or max((p.numel() for g in owned_params for p in g), default=1)
    if cfg.device == "cpu":
        from hf_zero.offload.cpu import CpuOffload

        return CpuOffload(owned_params, sub_group_size, cfg.pin_memory, force_copy=force_copy,
                          on_params_done=on_params_done, ratio=cfg.ratio)
    if cfg.device == "nvme":
        from hf_zero.offload.nvme import NvmeOffload

        return NvmeOffload(owned_params, sub_group_size, cfg.nvme_path, cfg.buffer_count, cfg.pin_memory,
                           rank, force_copy=force_copy, on_params_done=on_params_done, ratio=cfg.ratio)
    return NoOffload(owned_params, force_copy=force_copy)


def build_param_store(zero: ZeroConfig, model: torch.nn.Module, dtype: torch.dtype, world: int,
                      rank: int, compute_device: torch.device = torch.device("cpu")) -> ParamStore:
    """Where stage-3 shards live (``zero.offload_param``) for a model computing on
    ``compute_device``. The NVMe path is checked for this rank's shard bytes here, before
    any shard is built."""
    cfg = zero.offload_param
    if cfg.device != "none" and zero.offload_optimizer.device == "none" and compute_device.type != "cpu":
        # Keyed on where the parameters are, not on whether the host has a GPU: the 'none'
        # optimizer would step host shards with device gradients.
        raise ConfigError([("zero_optimization.offload_param.device",
                            "on an accelerator, parameter offload needs offload_optimizer.device cpu or nvme")])
    numel = sum(p.numel() for p in model.parameters())
    # Per-bucket padding is at most world - 1 elements per bucket; 1% + 1 MiB covers it.
    expected = int(numel * dtype.itemsize / world * 1.01) + 2 ** 20
    return ParamStore(cfg.device, nvme_path=cfg.nvme_path, pin_memory=cfg.pin_memory,
                      buffer_count=cfg.buffer_count, buffer_size=cfg.buffer_size, max_in_cpu=cfg.max_in_cpu,
                      rank=rank, expected_bytes=expected)


__all__ = ["OptimizerOffload", "ParamStore", "SwapIOError", "SwapSetupError", "build_optimizer_offload",
           "build_param_store"]
