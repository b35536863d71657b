"""The optimizer-offload protocol the engine and ``ZeroOptimizer`` call, and its 'none' backend.

[Note: offload backends]
An offload backend owns where the fp32 master chunks and the optimizer states live and how
one optimizer update walks over them. Three implementations sit behind this one protocol:

- ``none`` (this file): masters and states next to the parameters; the inner torch
  optimizer steps whole chunks (any elementwise optimizer), or, with
  ``fused_kernels: "triton"``, hf_zero_kernels' one-pass AdamW (``optim/fused_step.py``) is
  its update strategy, given to ``attach``.
- ``cpu`` (cpu.py): masters and Adam states in host memory (pinned when an accelerator
  exists); the update runs on the CPU in sub-groups (subgroups.py) and the updated weights
  are copied back to the parameters while the next sub-group is updated (step_loop.py).
- ``nvme`` (nvme.py): the same sub-group loop, but each sub-group's masters and Adam states
  live in a file; swapper.py reads sub-group i+1 and writes sub-group i-1 in background
  threads while sub-group i is updated, so resident optimizer memory is the swap buffers.

The tensors keep torch's layout in every backend (``inner.state[master]["exp_avg"]``...),
so ``optimizer.state_dict()`` and schedulers see the same objects; a backend whose tensors
are not resident (nvme: 0-byte storage) never materialises them whole. Checkpoints reach
the values through ``read_state`` / ``write_state`` ([Note: streamed optimizer state]).
``build_optimizer_offload`` (``hf_zero/offload/__init__.py``) is the only place that picks a
backend from the config.

[Note: streamed optimizer state]
Checkpoint save and load address the optimizer's tensors by (kind, group, chunk, element
range), kind being ``"master"`` or a state key (``"exp_avg"``). ``read_state`` yields the
range as consecutive 1D parts and ``write_state`` asks the caller to fill consecutive parts.
Resident backends (none, cpu) hand out one view of the tensor itself; nvme moves the part
held by each sub-group file through a swap buffer (two alternate, so the next part's I/O
overlaps the caller's work on this one), so saving or loading adds no memory proportional
to the model, whatever its size. Writing a master also writes the parameter chunk it
shadows (cast to the model dtype), as a step does. A checkpoint never needs a whole
optimizer state in memory; nothing in hf_zero materialises NVMe-held state.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from hf_zero.optim.master_weights import MasterWeights

if TYPE_CHECKING:
    from hf_zero.optim.fused_step import FusedAdamW


class OptimizerOffload(abc.ABC):
    """Where the optimizer's fp32 masters and states live, and how an update walks them."""

    location: str              # "device" (none), "cpu" or "nvme": where the optimizer states live
    updates_on_device: bool    # True when device kernels (hf_zero_kernels' fused AdamW) may run the update
    masters: MasterWeights     # the masters the inner optimizer steps (torch's param_groups point at them)
    # Called with parameter slices the backend is done reading or writing, off the step's
    # critical path (given to the constructor when stage-3 shards are mapped NVMe files, so
    # their pages are dropped as soon as a sub-group is done; backends without sub-groups
    # leave it to the end-of-step eviction).
    on_params_done: Optional[Callable[[list[torch.Tensor]], None]] = None

    update: Optional["FusedAdamW"] = None   # a device update strategy replacing inner.step (none only)

    def attach(self, inner: torch.optim.Optimizer, update: Optional["FusedAdamW"] = None) -> None:
        """Called once the inner optimizer over ``masters`` exists (creates / swaps out states).
        ``update``: hf_zero_kernels' fused AdamW over ``inner`` (``fused_kernels: "triton"``);
        only a backend that updates on the device takes one."""
        if update is not None and not self.updates_on_device:
            raise ValueError("fused_kernels='triton' runs the update on the device; offload_optimizer runs it "
                             "on the CPU (use 'auto' or 'off')")
        self.inner = inner
        self.update = update

    @property
    def norm_backend(self):
        """The hf_zero_kernels backend that computes the gradient norm (the update strategy's,
        so the norm's non-finite flag comes from the same pass); None: torch."""
        return None if self.update is None else self.update.backend

    @abc.abstractmethod
    def step(self, grads: list[list[torch.Tensor]], coefficient: torch.Tensor,
             overflow: Optional[torch.Tensor] = None) -> None:
        """Update masters from ``grads * coefficient`` and write the new weights into the
        parameters; ``grads`` is laid out like ``masters.masters``. ``overflow``: a device
        flag (dynamic loss scaling) that a device update strategy reads to skip the update
        without a host sync; the host has already skipped the step when it is set."""

    # ---- streamed access ([Note: streamed optimizer state]) ------------------------------
    def _resident_tensor(self, kind: str, group: int, chunk: int) -> torch.Tensor:
        master = self.masters.masters[group][chunk]
        return master if kind == "master" else self.inner.state[master][kind]

    def read_state(self, kind: str, group: int, chunk: int, start: int, length: int) -> Iterator[torch.Tensor]:
        """Elements [start, start + length) of ``kind`` ("master" or a state key) of master chunk
        ``masters.masters[group][chunk]``, in order, as 1D parts of the tensor's dtype (fp32 with
        offload); a part is valid only until the next one is requested. One stream at a time."""
        yield self._resident_tensor(kind, group, chunk).narrow(0, start, length)

    def write_state(self, kind: str, group: int, chunk: int, start: int, length: int,
                    fill: Callable[[int, torch.Tensor], None]) -> None:
        """Store new values of elements [start, start + length) of ``kind`` of chunk (group, chunk):
        ``fill(offset, part)`` writes elements [start + offset, start + offset + part.numel())
        into the 1D ``part`` (the tensor's dtype). A written master is also cast into its
        parameter chunk."""
        part = self._resident_tensor(kind, group, chunk).narrow(0, start, length)
        fill(0, part)
        if kind == "master":
            self._master_to_param(group, chunk, start, part)

    def _master_to_param(self, group: int, chunk: int, start: int, part: torch.Tensor) -> None:
        self.masters.write_param(group, chunk, start, part)

    def prepare_states(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        """Before loading a checkpoint holding the elementwise states ``keys``: give every master
        the states this backend will store and return their keys, each to be filled with
        ``write_state`` (the caller zeroes those the checkpoint lacks and sets scalar states).
        Default (torch's lazy states): exactly ``keys``, as zeros, everything else dropped."""
        for group in self.masters.masters:
            for master in group:
                state = self.inner.state[master]
                state.clear()
                for key in keys:
                    state[key] = torch.zeros_like(master)
        return keys

    def memory_by_location(self) -> dict[str, int]:
        """Bytes of optimizer masters/states this backend holds, by location
        (``offload_host`` in host memory, ``offload_nvme`` in swap files)."""
        return {"offload_host": 0, "offload_nvme": 0}

    def buffer_tensors(self) -> list[torch.Tensor]:
        """Staging / swap buffers (for memory accounting)."""
        return []

    def split_parts(self) -> list[torch.Tensor]:
        """Optimizer tensors that torch's layout does not show: the two parts of the master chunk
        that partial offload splits between the device and the offload storage ([Note: partial
        offload] in partial.py; an NVMe-held part has 0-byte storage)."""
        return []

    def close(self) -> None:
        """Release files and threads (engine.destroy and normal exit)."""


class NoOffload(OptimizerOffload):
    """Masters and states beside the parameters; the inner optimizer steps whole chunks."""

    location = "device"
    updates_on_device = True

    def __init__(self, owned_params: list[list[torch.Tensor]], force_copy: bool = False):
        self.masters = MasterWeights(owned_params, force_copy=force_copy)

    def step(self, grads: list[list[torch.Tensor]], coefficient: torch.Tensor,
             overflow: Optional[torch.Tensor] = None) -> None:
        if self.update is not None:   # one pass per chunk: unscale/clip, AdamW, write the parameter
            self.update.step(grads, coefficient.to(torch.float32), overflow)
            return
        self.masters.load_grads(grads, coefficient)
        self.inner.step()
        self.masters.finish_step()
