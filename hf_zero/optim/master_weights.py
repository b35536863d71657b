"""Precision policy: which tensors the optimizer updates, and how gradients reach them.

fp32 training updates this rank's chunks of the flat parameter buffers in place (no extra
copy: ZeRO's fp32 formulas count none). bf16/fp16 training keeps an fp32 master copy of
the owned chunks; gradients are upcast once per step and updated weights cast back.
"""

from __future__ import annotations

from typing import Optional

import torch


class MasterWeights:
    masters: list[list[torch.Tensor]]   # per group, per bucket: 1D fp32 tensors the optimizer steps

    def __init__(self, owned_params: list[list[torch.Tensor]], force_copy: bool = False,
                 device: torch.device | None = None, allocate: bool = True):
        """``device``: where the masters live (offload backends pass the host); default: with the
        parameters. A copy is kept when the parameters are not fp32 or live elsewhere.
        ``allocate=False`` (NVMe offload): copies get their shapes but 0-byte storage; the
        caller fills them from ``owned_params`` where it keeps them."""
        self.owned_params = owned_params
        dtypes = {p.dtype for group in owned_params for p in group}
        elsewhere = device is not None and any(p.device != device for group in owned_params for p in group)
        self.keeps_copy = force_copy or elsewhere or (dtypes != {torch.float32} and bool(dtypes))
        if self.keeps_copy and not allocate:
            self.masters = [[unallocated_fp32(p.numel(), device or p.device) for p in group] for group in owned_params]
        elif self.keeps_copy:
            self.masters = [[p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                             for p in group] for group in owned_params]
        else:
            self.masters = owned_params

    def load_grads(self, grads: list[list[torch.Tensor]], coefficient: torch.Tensor) -> None:
        """Set ``master.grad = grad * coefficient`` (the only pass over the gradients)."""
        for masters, group_grads in zip(self.masters, grads):
            for master, grad in zip(masters, group_grads):
                if self.keeps_copy:
                    master.grad = grad.to(device=master.device, dtype=torch.float32).mul_(coefficient)
                else:
                    master.grad = grad.mul_(coefficient)

    def finish_step(self) -> None:
        """Drop the gradients and write updated masters back into the model dtype chunks."""
        for gi, masters in enumerate(self.masters):
            for ci, master in enumerate(masters):
                master.grad = None
                self.write_param(gi, ci, 0, master)

    def param_target(self, group: int, chunk: int, start: int, numel: int) -> Optional[torch.Tensor]:
        """The parameter elements [start, start + numel) of chunk (group, chunk) that master
        values must be written into, or None when the chunk is the master itself."""
        if not self.keeps_copy:
            return None
        return self.owned_params[group][chunk].narrow(0, start, numel)

    def write_param(self, group: int, chunk: int, start: int, values: torch.Tensor) -> None:
        """Write master ``values`` (1D, fp32) into their parameter elements, cast to the model
        dtype: the one synchronous master -> parameter write (the offload step loop hands the
        same ``param_target`` to its background write-back)."""
        target = self.param_target(group, chunk, start, values.numel())
        if target is not None:
            target.copy_(values)

    def tensors(self) -> list[torch.Tensor]:
        return [m for group in self.masters for m in group] if self.keeps_copy else []


def unallocated_fp32(numel: int, device: torch.device) -> torch.Tensor:
    """A 1D fp32 tensor of ``numel`` elements with 0-byte storage (materialised later by resizing it)."""
    tensor = torch.empty(numel, dtype=torch.float32, device=device)
    tensor.untyped_storage().resize_(0)   # shape kept, no memory
    return tensor
