"""The CPU Adam/AdamW update of one sub-group, through torch's own kernels.

[Note: which CPU AdamW]
torch ships three CPU implementations: the per-tensor loop (default on CPU), ``foreach``
and ``fused`` (one vectorised, OpenMP-parallel pass per tensor). On this project's 2-core
machine they run at about 0.15x, 0.25x and 1.1x of the in-place streaming bandwidth limit
(28 bytes per parameter; benchmarks/offload.py): the fused kernel already streams each
element once, so there is nothing left for a hand-written kernel to win and hf_zero calls
it on sub-group slices instead. A group that explicitly asks for ``fused=False`` keeps its
choice (``foreach`` or the loop), so an offloaded run is bit-identical to the same run
without offload whatever the user picked; ``fused=None`` (torch's default) gets the fused
kernel. Slices of one chunk are independent elementwise updates; splitting a chunk into
sub-groups changes no bit of the result as long as the split points are aligned to the
kernel's vector width ([Note: split points] in subgroups.py).
"""

from __future__ import annotations

import torch

from hf_zero._torch_compat import adam as _adam_functional
from hf_zero.config.parse import ConfigError

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def check_offloadable(inner: torch.optim.Optimizer) -> None:
    """Offloaded updates run Adam/AdamW through torch's functional kernels: refuse others."""
    if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
        raise ConfigError([("zero_optimization.offload_optimizer.device",
                            f"offload runs Adam/AdamW on the CPU; got {type(inner).__name__}")])
    for group in inner.param_groups:
        if group.get("capturable") or group.get("differentiable"):
            raise ConfigError([("zero_optimization.offload_optimizer.device",
                                "offload does not support capturable/differentiable Adam")])


def state_keys(inner: torch.optim.Optimizer) -> tuple[str, ...]:
    """Elementwise state tensors per master, in torch's names (the on-disk order too)."""
    amsgrad = any(g.get("amsgrad") for g in inner.param_groups)
    return STATE_KEYS + (("max_exp_avg_sq",) if amsgrad else ())


def new_step_counter(master: torch.Tensor) -> torch.Tensor:
    # torch keeps the fused kernel's counter as a float32 scalar on the parameter's device.
    return torch.zeros((), dtype=torch.float32, device=master.device)


def runs_fused(group: dict) -> bool:
    """Whether ``group`` is updated by torch's fused kernel (the only one taking ``grad_scale``)."""
    fused = group.get("fused")
    return True if fused is None else bool(fused)


def adam_update(inner: torch.optim.Optimizer, group: dict, params: list[torch.Tensor],
                grads: list[torch.Tensor], states: dict[str, list[torch.Tensor]], step: float,
                grad_divisor: float | None = None) -> None:
    """One Adam(W) update of ``params`` (1D fp32 slices) with ``states`` slices, as the inner
    optimizer's ``group`` would do it at optimizer step ``step`` (1-based after this call).
    ``grad_divisor``: the fused kernel first divides each gradient by it, in place
    ([Note: folding the coefficient] in grad_pass.py); only where ``runs_fused(group)``."""
    fused = runs_fused(group)
    if grad_divisor is not None and not fused:
        raise ValueError("internal: only torch's fused Adam kernel divides gradients")
    foreach = None if fused else group.get("foreach")
    decoupled = type(inner) is torch.optim.AdamW or bool(group.get("decoupled_weight_decay", False))
    beta1, beta2 = group["betas"]
    # The kernels increment the counters they are given; each slice gets its own copy of the
    # master's count so slices of one chunk see the same step.
    # On the slices' device: a device sub-group ([Note: partial offload]) runs the device kernel.
    steps = [torch.full((), step - 1, dtype=torch.float32, device=p.device) for p in params]
    amsgrad = bool(group.get("amsgrad"))
    grad_scale = (None if grad_divisor is None or not params else
                  torch.tensor(grad_divisor, dtype=torch.float32, device=params[0].device))
    _adam_functional(
        params, grads, states["exp_avg"], states["exp_avg_sq"],
        states["max_exp_avg_sq"] if amsgrad else [], steps, foreach=foreach, fused=fused, grad_scale=grad_scale,
        decoupled_weight_decay=decoupled, amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=group["lr"],
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=bool(group.get("maximize")))
