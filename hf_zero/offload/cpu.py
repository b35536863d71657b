"""``offload_optimizer.device = "cpu"``: fp32 masters and Adam states resident in host memory.

The update walks them in sub-groups ([Note: sub-group schedule] in step_loop.py); with the
parameters on an accelerator the masters and states are pinned so that the copy-back of a
sub-group is an asynchronous DMA overlapping the next sub-group's update. With fp32
parameters already on the host (a CPU-only run) the parameter chunk is its own master, as
in the 'none' backend, and nothing is copied back.
"""

from __future__ import annotations

import torch

from hf_zero.offload.step_loop import SubGroupOffload, SubGroupViews
from hf_zero.offload.subgroups import SubGroup


def _pinned(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    # CUDA-only branch: page-locked host memory makes the copy-back an async DMA.
    return tensor.pin_memory() if pin else tensor


class CpuOffload(SubGroupOffload):
    location = "cpu"

    def __init__(self, owned_params: list[list[torch.Tensor]], sub_group_size: int, pin_memory: bool,
                 force_copy: bool = False, on_params_done=None, ratio: float = 1.0):
        super().__init__(owned_params, sub_group_size, force_copy, on_params_done, ratio)
        self.pin = pin_memory and self.on_accelerator   # CUDA parameters only: a CPU run pins nothing
        if self.pin and self.masters.keeps_copy:   # host copies only: device parts and placeholders stay
            self.masters.masters = [[_pinned(m, m.device == self.host and m.untyped_storage().nbytes() > 0)
                                     for m in g] for g in self.masters.masters]
            for split in self.split.values():
                split.offloaded["master"] = _pinned(split.offloaded["master"], True)
            self._chunk_of = {id(m): (gi, ci) for gi, g in enumerate(self.masters.masters) for ci, m in enumerate(g)}

    def _new_state(self, master: torch.Tensor) -> torch.Tensor:
        return _pinned(torch.zeros_like(master), self.pin)

    def _acquire(self, sub_group: SubGroup) -> SubGroupViews:
        return self._views(sub_group, on_device=False)

    def prepare_states(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        return self.state_keys   # created (pinned) at attach, fixed by the optimizer: filled in place

    def memory_by_location(self) -> dict[str, int]:
        kinds = (("master",) if self.masters.keeps_copy else ()) + self.state_keys
        return {"offload_host": sum(t.untyped_storage().nbytes() for t in self._offloaded_tensors(kinds)),
                "offload_nvme": 0}
