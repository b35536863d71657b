"""Which device a run computes on, and which device a collective's tensors must live on.

The rules are pure functions of their arguments (no CUDA call, no environment read inside),
so they are unit-tested on a machine without a GPU; ``compute_device_of`` gathers their
inputs once, at engine setup.

[Note: device selection]
The compute device is where the model's parameters already are (a model the script moved
with ``model.to(device)``). A model built under ``zero_init`` has only meta parameters; it
goes to ``cuda:LOCAL_RANK`` when CUDA is usable (the launcher's per-node rank, as torchrun,
accelerate and DeepSpeed set it; ``torch.cuda.current_device()`` would be device 0 on every
rank of a script that never called ``set_device``), else to the CPU. A collective's
tensors must live on a device the process group's backend serves: NCCL only moves CUDA
tensors, gloo and MPI host tensors (gloo also CUDA ones, through a host copy). So a small
host-born tensor that must cross ranks (the ``zero_init`` seed) is placed by
``collective_device``, not created on the CPU by habit.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch

# Backends that serve host tensors, in the order they are preferred for small host-born tensors.
_HOST_BACKENDS = ("gloo", "mpi", "ucc")
_CUDA_BACKENDS = ("nccl", "ucc", "gloo")


def backend_device_types(backend: str) -> dict[str, str]:
    """``dist.get_backend(group)``'s string as {device type: backend}: "nccl" ->
    {"cuda": "nccl"}, "gloo" -> {"cpu": "gloo", "cuda": "gloo"}, and the explicit form
    "cpu:gloo,cuda:nccl" (a group created without a backend) as written."""
    backend = backend.lower()
    if ":" in backend:
        pairs = (item.split(":", 1) for item in backend.split(",") if item)
        return {device.strip(): name.strip() for device, name in pairs}
    served = {}
    if backend in _HOST_BACKENDS:
        served["cpu"] = backend
    if backend in _CUDA_BACKENDS:
        served["cuda"] = backend
    if not served:   # a third-party backend: assume it serves the compute device only
        served["other"] = backend
    return served


def collective_device(backend: str, compute_device: torch.device) -> torch.device:
    """Where to put a small tensor that must go through a collective of a group with
    ``backend``: the host when the backend serves host tensors (no device round trip),
    else ``compute_device`` (NCCL: the rank's own GPU)."""
    served = backend_device_types(backend)
    if "cpu" in served:
        return torch.device("cpu")
    if compute_device.type == "cpu":
        raise ValueError(f"hf_zero: the process group's backend {backend!r} cannot move host tensors and the "
                         f"model is on the CPU; move the model to its accelerator before hf_zero.initialize, "
                         f"or use a gloo group")
    return compute_device


def select_compute_device(param_devices: Iterable[torch.device], cuda_available: bool,
                          local_rank: Optional[str], num_cuda_devices: int) -> torch.device:
    """The device this rank computes on ([Note: device selection]). ``param_devices``: the
    devices of the model's parameters; ``local_rank``: the ``LOCAL_RANK`` environment value
    (None when unset)."""
    placed = {d for d in param_devices if d.type != "meta"}
    if len(placed) > 1:
        raise ValueError(f"hf_zero: the model's parameters are on several devices {sorted(map(str, placed))}; "
                         f"move the whole model to one device before hf_zero.initialize")
    if placed:
        return placed.pop()
    if not cuda_available:
        return torch.device("cpu")
    index = int(local_rank) if local_rank not in (None, "") else 0
    if not 0 <= index < num_cuda_devices:
        raise ValueError(f"hf_zero: LOCAL_RANK={local_rank} but only {num_cuda_devices} CUDA device(s) are "
                         f"visible; launch one process per GPU or set CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def compute_device_of(model: torch.nn.Module) -> torch.device:
    """This rank's device for ``model``. CUDA is queried only for a model without placed
    parameters (``zero_init``): a placed model decides alone, so a CPU run calls no CUDA API."""
    devices = {p.device for p in model.parameters()}
    if any(d.type != "meta" for d in devices):
        return select_compute_device(devices, False, None, 0)
    available = torch.cuda.is_available()
    return select_compute_device(devices, available, os.environ.get("LOCAL_RANK"),
                                 torch.cuda.device_count() if available else 0)


def uses_cuda(device: torch.device) -> bool:
    """The one test every CUDA-only branch keys on: where the tensors are, never
    ``torch.cuda.is_available()`` (a CPU run on a GPU host takes no CUDA branch)."""
    return device.type == "cuda"
