"""The optimizer update through hf_zero_kernels: one fused pass per owned chunk.

Used on CUDA (``fused_kernels: "auto"``) or forced (``"triton"``; on CPU tensors that runs
the Triton interpreter, which is how the tests cover this path without a GPU). The Adam
moments live in the inner optimizer's ``state`` under torch's names, so checkpoints and
``state_dict()`` see the same layout as with the torch path. The update skips itself on the
device when the overflow flag is set, and writes the bf16/fp16 parameter chunk in the same
pass, so no separate write-back is needed.
"""

from __future__ import annotations

import torch

from hf_zero_kernels import fused_adamw_, sumsq_and_nonfinite


def fused_supported(inner: torch.optim.Optimizer) -> bool:
    """Plain AdamW (decoupled decay, no amsgrad/maximize/capturable) is what the kernel computes."""
    if type(inner) is not torch.optim.AdamW:
        return False
    return all(not g.get("amsgrad") and not g.get("maximize") and not g.get("capturable")
               for g in inner.param_groups)


def norm_inputs(grads: list[torch.Tensor], backend: str) -> torch.Tensor:
    """A 2-element fp32 tensor [sum of squares, number of non-finite elements] in one pass;
    one all-reduce (SUM) of it gives the global norm input and the overflow signal."""
    device = grads[0].device if grads else torch.device("cpu")
    out = torch.empty(2, dtype=torch.float32, device=device)
    if grads:
        sumsq_and_nonfinite(grads, out=out, backend=backend)
    else:
        out.zero_()
    return out


class FusedAdamW:
    def __init__(self, inner: torch.optim.Optimizer, owned_params: list[list[torch.Tensor]],
                 keeps_copy: bool, backend: str):
        self.inner = inner
        self.owned_params = owned_params
        self.keeps_copy = keeps_copy   # masters are separate from the parameter chunks
        self.backend = backend

    def step(self, grads: list[list[torch.Tensor]], grad_scale: torch.Tensor,
             overflow: torch.Tensor | None) -> None:
        for group, group_grads, params in zip(self.inner.param_groups, grads, self.owned_params):
            beta1, beta2 = group["betas"]
            for master, grad, param in zip(group["params"], group_grads, params):
                state = self.inner.state[master]
                lowp = self.keeps_copy and param.dtype in (torch.bfloat16, torch.float16)
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)   # host tensor, as torch keeps it
                    state["exp_avg"] = torch.zeros_like(master)
                    state["exp_avg_sq"] = torch.zeros_like(master)
                fused_adamw_(master, grad, state["exp_avg"], state["exp_avg_sq"], lr=float(group["lr"]),
                             beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                             step=int(state["step"].item()) + 1, grad_scale=grad_scale, overflow=overflow,
                             out_lowp=param if lowp else None, backend=self.backend)
                state["step"] += 1
                if self.keeps_copy and not lowp:   # fp32 parameters with a separate master copy
                    param.copy_(master)
