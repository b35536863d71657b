"""Global gradient norm over all partitions, and torch's clipping coefficient."""

from __future__ import annotations

import torch

from hf_zero.comm import Collectives


def global_grad_norm(grads: list[torch.Tensor], comm: Collectives, partitioned: bool) -> torch.Tensor:
    """2-norm of the concatenation of every rank's ``grads`` (each rank passes its own chunks
    when ``partitioned``; otherwise every rank holds all gradients and no reduction is needed).

    Non-finite values anywhere propagate into the result on every rank (one all-reduce
    carries both the norm and the overflow signal).
    """
    device = grads[0].device if grads else torch.device("cpu")
    sumsq = torch.zeros(1, dtype=torch.float32, device=device)
    for grad in grads:
        sumsq += torch.linalg.vector_norm(grad, dtype=torch.float32).square()
    if partitioned:
        comm.all_reduce_sum(sumsq)
    return sumsq.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``'s factor, computed in fp32 exactly as torch does:
    min(1, max_norm / (norm + 1e-6)); 1 when clipping is off."""
    if max_norm <= 0:
        return torch.ones_like(norm)
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)
