"""The optimizer update through hf_zero_kernels: one fused pass per owned chunk.

Used only when asked for (``fused_kernels: "triton"``; on CPU tensors that runs the Triton
interpreter, which is how the tests cover this path without a GPU); "auto" keeps torch's
fused AdamW until the kernels have passed ``make gpu-check`` on a device. The Adam moments
and the step counter live in the inner optimizer's ``state`` under torch's names and where
torch keeps them (the counter on the master's device for a fused or capturable group, else
a host scalar), so checkpoints and ``state_dict()`` interchange with the torch path. The update skips itself on the
device when the overflow flag is set, and writes the bf16/fp16 parameter chunk in the same
pass, so no separate write-back is needed.
"""

from __future__ import annotations

import torch

from hf_zero.optim.master_weights import MasterWeights
from hf_zero_kernels import Backend, fused_adamw_, sumsq_and_nonfinite


def fused_supported(inner: torch.optim.Optimizer) -> bool:
    """Plain AdamW (decoupled decay, no amsgrad/maximize/capturable) is what the kernel computes."""
    if type(inner) is not torch.optim.AdamW:
        return False
    return all(not g.get("amsgrad") and not g.get("maximize") and not g.get("capturable")
               for g in inner.param_groups)


def norm_inputs(grads: list[torch.Tensor], backend: Backend) -> torch.Tensor:
    """A 2-element fp32 tensor [sum of squares, number of non-finite elements] in one pass;
    one all-reduce (SUM) of it gives the global norm input and the overflow signal."""
    device = grads[0].device if grads else torch.device("cpu")
    out = torch.empty(2, dtype=torch.float32, device=device)
    if grads:
        sumsq_and_nonfinite(grads, out=out, backend=backend)
    else:
        out.zero_()
    return out


def new_step_counter(group: dict, master: torch.Tensor) -> torch.Tensor:
    """Adam's step counter as torch.optim.Adam(W) creates it for ``group``: fp32 on the
    master's device when the group is fused or capturable, else a host fp32 scalar."""
    on_device = bool(group.get("fused")) or bool(group.get("capturable"))
    return torch.zeros((), dtype=torch.float32, device=master.device if on_device else "cpu")


class FusedAdamW:
    """The in-memory offload backend's update strategy for ``fused_kernels: "triton"``
    (offload/protocol.py): one kernel pass per chunk unscales and clips the gradient, runs
    AdamW on the fp32 master and writes the bf16/fp16 parameter; step counters in torch's layout."""

    def __init__(self, inner: torch.optim.Optimizer, masters: MasterWeights, backend: Backend):
        self.inner = inner
        self.masters = masters
        self.keeps_copy = masters.keeps_copy   # masters are separate from the parameter chunks
        self.backend = backend
        # The kernel takes the step as a Python int; reading a device counter costs a host
        # sync, so its value is cached per counter tensor and re-read only when something else
        # (a checkpoint load, a user) changed it: torch bumps ``_version`` on every in-place write.
        # id(counter) -> (counter, _version, value); the counter is held so its id stays unique.
        self._known_steps: dict[int, tuple[torch.Tensor, int, int]] = {}

    def _step_of(self, counter: torch.Tensor) -> int:
        known = self._known_steps.get(id(counter))
        if known is not None and known[0] is counter and known[1] == counter._version:
            return known[2]
        return int(counter.item())

    def _advance(self, counter: torch.Tensor, value: int) -> None:
        counter += 1
        self._known_steps[id(counter)] = (counter, counter._version, value + 1)

    def step(self, grads: list[list[torch.Tensor]], grad_scale: torch.Tensor,
             overflow: torch.Tensor | None) -> None:
        for gi, (group, group_grads) in enumerate(zip(self.inner.param_groups, grads)):
            beta1, beta2 = group["betas"]
            for ci, (master, grad) in enumerate(zip(group["params"], group_grads)):
                param = self.masters.owned_params[gi][ci]
                state = self.inner.state[master]
                lowp = self.keeps_copy and param.dtype in (torch.bfloat16, torch.float16)
                if not state:
                    state["step"] = new_step_counter(group, master)
                    state["exp_avg"] = torch.zeros_like(master)
                    state["exp_avg_sq"] = torch.zeros_like(master)
                done = self._step_of(state["step"])
                fused_adamw_(master, grad, state["exp_avg"], state["exp_avg_sq"], lr=float(group["lr"]),
                             beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                             step=done + 1, grad_scale=grad_scale, overflow=overflow,
                             out_lowp=param if lowp else None, backend=self.backend)
                self._advance(state["step"], done)
                if not lowp:   # fp32 parameters with a separate master copy (the kernel wrote low-precision ones)
                    self.masters.write_param(gi, ci, 0, master)
