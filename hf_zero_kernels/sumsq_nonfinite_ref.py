"""Reference sum of squares and non-finite count over flat buffers: the specification of
``sumsq_nonfinite``, the CPU fallback and the test oracle.

These are the two inputs of the global gradient norm and of the fp16 overflow check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK_NUMEL = 1 << 24   # 64 MiB of fp32 temporaries at most


def sumsq_and_nonfinite_ref(
    tensors: Sequence[torch.Tensor],   # each 1D fp32 / bf16 / fp16 (fp64 for the oracle)
    out: torch.Tensor,                 # 2 elements fp32 (fp64 for the oracle): written whole
) -> tuple[torch.Tensor, torch.Tensor]:
    """out[0] = sum over every element x of every tensor of float(x)^2;
    out[1] = how many of those elements are inf or NaN (a float count; 0 means all finite).

    Returns the views (out[0:1], out[1:2]). Both live in one buffer so that a single
    all-reduce (SUM) combines ranks: the sums add, the counts add, a non-finite value
    anywhere also makes out[0] non-finite.

    The sum is torch's (cascade) ``sum`` of the upcast squares, chunk by chunk so the fp32
    temporary stays bounded. Not ``vector_norm(x, dtype=fp32).square()``: on CPU that is
    ~1e-5 relative off an fp64 sum at 1M elements, this stays near 1e-7.
    """
    sumsq = torch.zeros((), dtype=out.dtype, device=out.device)
    num_nonfinite = torch.zeros((), dtype=torch.int64, device=out.device)
    for t in tensors:
        for chunk in t.split(CHUNK_NUMEL):
            sumsq += chunk.to(out.dtype).square().sum()
            num_nonfinite += chunk.numel() - torch.isfinite(chunk).sum()
    out[0] = sumsq
    out[1] = num_nonfinite.to(out.dtype)
    return out[0:1], out[1:2]
