"""The optimizer-offload protocol the engine and ``ZeroOptimizer`` call, and its 'none' backend.

[Note: offload backends]
An offload backend owns where the fp32 master chunks and the optimizer states live and how
one optimizer update walks over them. Three implementations sit behind this one protocol:

- ``none`` (this file): masters and states next to the parameters; the inner torch
  optimizer steps whole chunks (any elementwise optimizer; Triton kernels on CUDA).
- ``cpu`` (cpu.py): masters and Adam states in host memory (pinned when an accelerator
  exists); the update runs on the CPU in sub-groups (subgroups.py) and the updated weights
  are copied back to the parameters while the next sub-group is updated (step_loop.py).
- ``nvme`` (nvme.py): the same sub-group loop, but each sub-group's masters and Adam states
  live in a file; swapper.py reads sub-group i+1 and writes sub-group i-1 in background
  threads while sub-group i is updated, so resident optimizer memory is the swap buffers.

The tensors keep torch's layout in every backend (``inner.state[master]["exp_avg"]``...),
so checkpoints, ``optimizer.state_dict()`` and schedulers see the same objects; a backend
whose tensors are not resident (nvme: storage resized to 0 bytes) materialises them inside
``resident()``. ``build_optimizer_offload`` (``hf_zero/offload/__init__.py``) is the only
place that picks a backend from the config.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Iterator

import torch

from hf_zero.optim.master_weights import MasterWeights


class OptimizerOffload(abc.ABC):
    """Where the optimizer's fp32 masters and states live, and how an update walks them."""

    location: str              # "device" (none), "cpu" or "nvme": where the optimizer states live
    updates_on_device: bool    # True when device kernels (hf_zero_kernels' fused AdamW) may run the update
    masters: MasterWeights     # the masters the inner optimizer steps (torch's param_groups point at them)

    def attach(self, inner: torch.optim.Optimizer) -> None:
        """Called once the inner optimizer over ``masters`` exists (creates / swaps out states)."""
        self.inner = inner

    @abc.abstractmethod
    def step(self, grads: list[list[torch.Tensor]], coefficient: torch.Tensor) -> None:
        """Update masters from ``grads * coefficient`` and write the new weights into the
        parameters; ``grads`` is laid out like ``masters.masters``."""

    @contextlib.contextmanager
    def resident(self, write_back: bool = False) -> Iterator[None]:
        """Inside, every master and optimizer-state tensor is materialised in ``masters`` /
        ``inner.state``; with ``write_back`` what was changed there is kept on exit."""
        yield

    def reload_from_params(self) -> None:
        """The parameters were edited outside the optimizer: make the masters match them."""
        with self.resident(write_back=True):
            self.masters.reload_from_params()

    def memory_by_location(self) -> dict[str, int]:
        """Bytes of optimizer masters/states this backend holds, by location
        (``offload_host`` in host memory, ``offload_nvme`` in swap files)."""
        return {"offload_host": 0, "offload_nvme": 0}

    def buffer_tensors(self) -> list[torch.Tensor]:
        """Staging / swap buffers (for memory accounting)."""
        return []

    def close(self) -> None:
        """Release files and threads (engine.destroy and normal exit)."""


class NoOffload(OptimizerOffload):
    """Masters and states beside the parameters; the inner optimizer steps whole chunks."""

    location = "device"
    updates_on_device = True

    def __init__(self, owned_params: list[list[torch.Tensor]], force_copy: bool = False):
        self.masters = MasterWeights(owned_params, force_copy=force_copy)

    def step(self, grads: list[list[torch.Tensor]], coefficient: torch.Tensor) -> None:
        self.masters.load_grads(grads, coefficient)
        self.inner.step()
        self.masters.finish_step()

    def reload_from_params(self) -> None:
        self.masters.reload_from_params()
