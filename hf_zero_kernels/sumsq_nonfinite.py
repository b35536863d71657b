"""Sum of squares and non-finite count over flat buffers in one pass (Triton).

Two kernels: every program of ``_partials_kernel`` reduces one block of one buffer to a
partial sum of squares and a partial count; ``_finish_kernel`` (one program) adds the
partials in a fixed order. No atomics: the result is bit-reproducible run to run, which the
engine's bit-identical-loss tests need. The buffers of a list each get a launch of the
first kernel (ZeRO has a handful of flat buffers, not thousands of small tensors), all
writing into one partials buffer, then one finishing launch. Specification:
``sumsq_nonfinite_ref.py``; public entry point: ``hf_zero_kernels.sumsq_and_nonfinite``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from hf_zero_kernels._triton_utils import LAUNCH_OPTIONS, device_guard

BLOCK = 4096          # elements per partial: 16 per thread at 8 warps
NUM_WARPS = 8
FINISH_BLOCK = 1024   # partials added per iteration of the finishing program
FLT_MAX = tl.constexpr(3.4028234663852886e38)   # jit globals must be constexpr


@triton.jit
def _partials_kernel(x_ptr, sumsq_ptr, count_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)   # upcast is exact
    # sumsq_ptr[pid] = sum x^2 over the block (fp32; inf/NaN propagate into it)
    tl.store(sumsq_ptr + pid, tl.sum(x * x, axis=0))
    # count_ptr[pid] = #{x : x is NaN (x != x) or |x| = inf (|x| > FLT_MAX)}
    nonfinite = (x != x) | (tl.abs(x) > FLT_MAX)  # noqa: PLR0124 (NaN test)
    tl.store(count_ptr + pid, tl.sum(nonfinite.to(tl.float32), axis=0))


@triton.jit
def _finish_kernel(sumsq_ptr, count_ptr, out_ptr, num_partials, BLOCK: tl.constexpr):
    # out[0] = sum of sumsq partials, out[1] = sum of counts: one program, fixed order
    acc_sumsq = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_count = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, num_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_partials
        acc_sumsq += tl.load(sumsq_ptr + offs, mask=mask, other=0.0)
        acc_count += tl.load(count_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr, tl.sum(acc_sumsq, axis=0))
    tl.store(out_ptr + 1, tl.sum(acc_count, axis=0))


def sumsq_and_nonfinite_triton(
    tensors: Sequence[torch.Tensor],   # each 1D contiguous fp32 / bf16 / fp16, one device
    out: torch.Tensor,                 # 2 elements fp32 on that device: written whole
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two kernels; returns (out[0:1], out[1:2]) as ``sumsq_and_nonfinite_ref``.
    Arguments are already validated by hf_zero_kernels.sumsq_and_nonfinite."""
    tensors = [t for t in tensors if t.numel() > 0]
    num_blocks = [triton.cdiv(t.numel(), BLOCK) for t in tensors]
    num_partials = sum(num_blocks)
    partials = torch.empty((2, max(num_partials, 1)), dtype=torch.float32, device=out.device)  # (2, P)
    with device_guard(out):
        start = 0
        for t, n in zip(tensors, num_blocks):
            _partials_kernel[(n,)](
                t, partials[0, start:], partials[1, start:], t.numel(),
                BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
            )
            start += n
        _finish_kernel[(1,)](
            partials[0], partials[1], out, num_partials,
            BLOCK=FINISH_BLOCK, num_warps=4, **LAUNCH_OPTIONS,
        )
    return out[0:1], out[1:2]
