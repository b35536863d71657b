"""Lamb (You et al. 2019) as DeepSpeed's ``Lamb`` type (FusedLamb) computes it, on shards.

Per parameter: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
``u = m / (sqrt(v) + eps) + wd w``, trust ratio ``r = clamp(||w|| / ||u||, min_coeff,
max_coeff)`` (1 when either norm is 0), ``w -= step_size r u`` with ``step_size = lr
sqrt(1 - b2^t) / (1 - b1^t)`` under bias correction, else ``lr``. Everything but the two
norms is elementwise; the norms come from ``TensorLayout.sum_squares`` ([Note: whole-tensor
optimizers on shards] in tensor_layout.py). Padding elements belong to no parameter and
are never updated.
"""

from __future__ import annotations

import math

import torch

from hf_zero.optim.tensor_layout import TensorwiseOptimizer


class Lamb(TensorwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, bias_correction: bool = True, max_coeff: float = 10.0,
                 min_coeff: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Lamb over hf_zero shards does not take a closure")
        layout = self._require_layout()
        updates: dict[int, list[torch.Tensor]] = {}
        stepped = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"])
                update.add_(p, alpha=group["weight_decay"])
                updates[id(p)] = [p, update]
                stepped.append((group, p, update, int(state["step"].item())))
        # One (collective) pass for every parameter's ||w||^2 and ||u||^2.
        norms = layout.sum_squares(updates).sqrt().cpu()   # (2, num_params): ||w||, ||u||
        for group, p, update, step in stepped:
            beta1, beta2 = group["betas"]
            step_size = group["lr"]
            if group["bias_correction"]:
                step_size *= math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
            for s in layout.slices[id(p)]:
                w_norm, u_norm = float(norms[0, s.param]), float(norms[1, s.param])
                ratio = 1.0
                if w_norm != 0 and u_norm != 0:
                    ratio = min(max(w_norm / u_norm, group["min_coeff"]), group["max_coeff"])
                p.narrow(0, s.chunk_start, s.length).add_(update.narrow(0, s.chunk_start, s.length),
                                                          alpha=-step_size * ratio)
        return None
