"""Muon with an auxiliary Adam, as DeepSpeed's ``Muon`` type builds it, on shards.

DeepSpeed tags a parameter for Muon when it has at least 2 dimensions and its name holds
neither "embed" nor "lm_head"; the rest get the auxiliary Adam. Muon, per matrix:
``buf = lerp(buf, g, 1 - momentum)``; ``u = lerp(g, buf, momentum)`` (Nesterov);
``o = NS5(u) x max(1, rows / cols) ** 0.5``; ``w = w (1 - lr wd) - lr o``. The auxiliary Adam:
``m = lerp(m, g, 1 - b1)``, ``v = lerp(v, g^2, 1 - b2)``,
``w = w (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.
Newton-Schulz runs on the whole matrix, gathered per bucket ([Note: whole-tensor optimizers on
shards] in tensor_layout.py), in fp32 (DeepSpeed uses bf16/fp16 where the device supports it:
the same map with less rounding here). Every master chunk keeps all three states
(``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``) elementwise, so checkpoints reshard as for
Adam: 12 bytes of state per parameter, where DeepSpeed keeps 4 for matrices and 8 for the rest.
A schedule scales the group's ``lr`` (the Muon rate); the auxiliary rate keeps its ratio to it.
Difference: DeepSpeed keeps Muon and Adam in two param groups, so its schedulers (which set
every group to the same rate) override ``adam_lr`` there; without a schedule both agree.
"""

from __future__ import annotations

import torch

from hf_zero.optim.tensor_layout import TensorwiseOptimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def uses_muon(name: str, shape: torch.Size) -> bool:
    """DeepSpeed's rule (runtime/engine: set_optimizer_flags)."""
    return len(shape) >= 2 and not any(k in name.lower() for k in ("embed", "lm_head"))


def orthogonalise(update: torch.Tensor) -> torch.Tensor:
    """Quintic Newton-Schulz (5 steps) scaled by max(1, rows / cols) ** 0.5, as DeepSpeed: a 4D
    (convolution) weight as one matrix of its first dimension by the rest; 3D and higher as a
    batch of matrices over the leading dimensions (e.g. a fused MoE expert stack)."""
    x = (update.reshape(update.shape[0], -1) if update.ndim == 4 else update).float()
    rows, cols = x.shape[-2], x.shape[-1]
    if rows > cols:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(NS_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if rows > cols:
        x = x.mT
    return x.mul_(max(1.0, rows / cols) ** 0.5)


class Muon(TensorwiseOptimizer):
    def __init__(self, params, lr: float = 0.02, adam_lr: float = 3e-4, momentum: float = 0.95,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-10):
        super().__init__(params, dict(lr=lr, adam_lr_ratio=adam_lr / lr if lr else 1.0, momentum=momentum,
                                      weight_decay=weight_decay, betas=tuple(betas), eps=eps))

    def _elementwise(self, group: dict, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Nesterov momentum update, Adam update) for the whole chunk; states advanced."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p)
        state["step"] += 1
        step = float(state["step"])
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["momentum_buffer"].lerp_(grad, 1 - group["momentum"])
        nesterov = grad.lerp(state["momentum_buffer"], group["momentum"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].lerp_(grad.square(), 1 - beta2)
        adam = (state["exp_avg"] / (1 - beta1 ** step)) / ((state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt()
                                                            + group["eps"])
        return nesterov, adam

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon over hf_zero shards does not take a closure")
        layout = self._require_layout()
        muon = {i for i, (name, shape) in enumerate(zip(layout.names, layout.shapes)) if uses_muon(name, shape)}
        pending, nesterov_by_master = [], {}
        for group in self.param_groups:
            for p in group["params"]:
                nesterov, adam = self._elementwise(group, p)
                nesterov_by_master[id(p)] = nesterov
                pending.append((group, p, adam))
        whole = layout.whole_tensors(nesterov_by_master, muon)   # gathers buckets holding matrices
        orthogonal = {i: orthogonalise(t).reshape(-1) for i, t in whole.items()}
        for group, p, adam in pending:
            muon_lr = group["lr"]
            adam_lr = muon_lr * group["adam_lr_ratio"]
            for s in layout.slices[id(p)]:
                target = p.narrow(0, s.chunk_start, s.length)
                if s.param in muon:
                    update, lr = orthogonal[s.param].narrow(0, s.param_start, s.length), muon_lr
                else:
                    update, lr = adam.narrow(0, s.chunk_start, s.length), adam_lr
                target.mul_(1 - lr * group["weight_decay"]).add_(update.to(target.dtype), alpha=-lr)
        return None
