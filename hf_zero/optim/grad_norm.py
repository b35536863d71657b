"""The global gradient norm over all partitions (the one place it is computed, with the
non-finite flag that dynamic loss scaling reads), and torch's clipping coefficient."""

from __future__ import annotations

from typing import Optional

import torch

from hf_zero.comm import Collectives
from hf_zero_kernels import Backend


def global_grad_norm(grads: list[torch.Tensor], comm: Collectives, partitioned: bool,
                     backend: Optional[Backend] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(2-norm of the concatenation of every rank's ``grads``, non-finite flag), both fp32
    1-element tensors on the gradients' device; the flag is 1.0 when some gradient element
    (or the sum of squares) is not finite. Each rank passes its own chunks when ``partitioned``;
    otherwise every rank holds all gradients and no reduction is needed. One all-reduce
    carries both, so every rank sees the same norm and flag.

    ``backend`` None: torch's per-tensor ``vector_norm``; otherwise hf_zero_kernels' one-pass
    sum of squares and non-finite count on that backend (``fused_kernels: "triton"``).
    """
    if backend is None:
        device = grads[0].device if grads else torch.device("cpu")
        sumsq = torch.zeros(1, dtype=torch.float32, device=device)
        for grad in grads:
            sumsq += torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if partitioned:
            comm.all_reduce_sum(sumsq)
        return sumsq.sqrt(), (~torch.isfinite(sumsq)).to(torch.float32)
    from hf_zero.optim.fused_step import norm_inputs

    stats = norm_inputs(grads, backend)   # [sum of squares, non-finite count]
    if partitioned:
        comm.all_reduce_sum(stats)
    return stats[0:1].sqrt(), ((stats[1:2] > 0) | ~torch.isfinite(stats[0:1])).to(torch.float32)


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``'s factor, computed in fp32 exactly as torch does:
    min(1, max_norm / (norm + 1e-6)); 1 when clipping is off."""
    if max_norm <= 0:
        return torch.ones_like(norm)
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)
