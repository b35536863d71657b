"""Reference AdamW step over a flat master shard: the specification of ``fused_adamw``, the
CPU fallback, and the test oracle (run in float64 it is the exact-arithmetic oracle).

It is torch.optim.AdamW's single-tensor step written with the same torch calls, in the same
order, plus the two things a ZeRO step folds in: the combined gradient scale and the
skip-on-overflow flag.
"""

from __future__ import annotations

import torch


def fused_adamw_ref(
    master: torch.Tensor,       # 1D fp32 (or fp64 for the oracle): updated in place
    grad: torch.Tensor,         # 1D fp32 / bf16 / fp16, same numel: read only
    exp_avg: torch.Tensor,      # 1D, master's dtype: updated in place
    exp_avg_sq: torch.Tensor,   # 1D, master's dtype: updated in place
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: torch.Tensor,               # 1 element fp32: 1 / loss_scale x clip coefficient
    overflow: torch.Tensor | None = None,   # 1 element; nonzero (or NaN) skips the step
    out_lowp: torch.Tensor | None = None,   # 1D bf16 / fp16: receives the updated master
) -> None:
    """One AdamW step (torch.optim.AdamW semantics, decoupled weight decay), with
    g = float(grad) x grad_scale, skipped entirely when ``overflow`` is set:

        p  = p * (1 - lr * wd)
        m  = m + (1 - b1) * (g - m)           (= b1 m + (1 - b1) g, as torch's lerp_)
        v  = b2 v + (1 - b2) g g
        p  = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Reading ``overflow`` here is a host sync; the Triton kernel reads it on the device.
    """
    if overflow is not None and bool(overflow.ne(0).item()):   # NaN != 0 too: skip
        return
    # Upcast first, then scale (as hf_zero's MasterWeights.load_grads does): bf16/fp16
    # gradients are exact in fp32, so the product is rounded once. Out of place: ``grad``
    # is read only (``.to`` returns ``grad`` itself when it is already fp32).
    g = grad.to(master.dtype) * grad_scale.to(master.dtype)
    if weight_decay != 0:
        master.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-step_size)
    if out_lowp is not None:
        out_lowp.copy_(master)   # round to nearest even, like the kernel's store
