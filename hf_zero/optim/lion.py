"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as DeepSpeed's
``Lion`` type computes it. Elementwise, so it steps flat shards like any torch optimizer."""

from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    """``update = sign(beta1 * m + (1 - beta1) * g)``; ``w = w * (1 - lr * wd) - lr * update``;
    ``m = beta2 * m + (1 - beta2) * g``. State: ``exp_avg`` (the momentum m)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Lion hyperparameters lr={lr}, betas={betas}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss
