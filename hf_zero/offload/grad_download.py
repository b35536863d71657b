"""Bringing a sub-group's gradient slices from the accelerator to the host ahead of their update.

[Note: gradient download]
The CPU update of sub-group i needs i's gradient slices on the host. A blocking copy into
pageable memory serialises everything: the host waits for the device, and no transfer
runs while the CPU computes. Here the slices of sub-group i+1 are downloaded while i is
updated, as DeepSpeed's CPU offload does:

- two page-locked buffers (slots) in the gradients' own dtype, each one sub-group long;
  the device->host copy moves the reduced bytes as they are (2 bytes per bf16 element, not
  4), and the fp32 cast happens on the host, into the step's fp32 staging ([Note: folding
  the coefficient] in grad_pass.py);
- the copies run on one download stream. Who waits on whom: the download stream waits once
  per step on the compute stream (the reductions that wrote the gradients were queued
  there, or joined to it by ``wait_for_reductions``); the host waits on a slot's event
  before reading the slot (``take``); a slot is refilled only for sub-group i+2, after
  the host has finished updating i from it (the update is synchronous on the host), so
  the copy never overwrites bytes still being read. The gradients themselves are not
  freed or zeroed before ``finish`` makes the compute stream wait on the download stream:
  ``zero_grad`` after the step is queued behind the last download.

Cost: two sub-groups of page-locked memory in the gradients' dtype (4 bytes per element of
the largest sub-group for bf16); torch's pinned-memory cache keeps them between steps.
On the CPU the same slots are plain host buffers filled by synchronous copies (used only
when a test asks for it, to run this schedule without a GPU); gradients already on the
host normally go to the update directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from hf_zero.offload.subgroups import SubGroup, max_sub_group_numel


class _Slot:
    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}   # dtype -> 1D, one sub-group long
        self.event: Optional[torch.cuda.Event] = None        # CUDA event of the last copy into it

    def buffer(self, dtype: torch.dtype, numel: int, pin: bool) -> torch.Tensor:
        if dtype not in self.buffers:
            self.buffers[dtype] = torch.empty(numel, dtype=dtype, pin_memory=pin)
        return self.buffers[dtype]


class GradDownload:
    """One step's downloads (``start`` i+1, ``take`` i); the slots live for the step only."""

    def __init__(self, grads: list[list[torch.Tensor]], plan: list[SubGroup]):
        self.grads = grads
        self.numel = max_sub_group_numel(plan)
        device = next((g.device for gs in grads for g in gs if g.device.type != "cpu"), torch.device("cpu"))
        self.cuda = device.type == "cuda"
        self.slots = (_Slot(), _Slot())
        self.views: dict[int, list[torch.Tensor]] = {}   # sub-group index -> host slices
        self.stream = None
        if self.cuda:
            # CUDA-only branch: the download stream starts after everything queued so far on
            # the compute stream (the gradient reductions); see [Note: gradient download].
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))

    def start(self, sub_group: SubGroup) -> None:
        """Begin copying ``sub_group``'s gradient slices into its slot (asynchronous on CUDA)."""
        slot = self.slots[sub_group.index % 2]
        views = []
        for s in sub_group.slices:
            grad = self.grads[s.group][s.chunk].narrow(0, s.start, s.length)
            views.append(slot.buffer(grad.dtype, self.numel, self.cuda).narrow(0, s.offset, s.length))
        if self.cuda:
            with torch.cuda.stream(self.stream):
                for view, s in zip(views, sub_group.slices):
                    view.copy_(self.grads[s.group][s.chunk].narrow(0, s.start, s.length), non_blocking=True)
                slot.event = torch.cuda.Event()
                slot.event.record(self.stream)
        else:
            for view, s in zip(views, sub_group.slices):
                view.copy_(self.grads[s.group][s.chunk].narrow(0, s.start, s.length))
        self.views[sub_group.index] = views

    def take(self, sub_group: SubGroup) -> list[torch.Tensor]:
        """``sub_group``'s slices on the host (their own dtype), once downloaded. Valid until
        ``start`` of sub-group index + 2 (the same slot)."""
        slot = self.slots[sub_group.index % 2]
        if slot.event is not None:
            slot.event.synchronize()   # the host reads the slot only after its copy completed
        return self.views.pop(sub_group.index)

    def finish(self) -> None:
        """End of step: later work on the compute stream (zero_grad, the next backward) is
        ordered after the downloads that read the gradients."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


def downloads_needed(grads: list[list[torch.Tensor]], forced: Optional[bool]) -> bool:
    """Whether the step goes through ``GradDownload``: gradients on an accelerator, or a
    test's ``forced=True`` (the same schedule with host copies)."""
    if forced is not None:
        return forced
    return any(g.device.type == "cuda" for gs in grads for g in gs)
