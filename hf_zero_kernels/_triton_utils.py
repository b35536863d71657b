"""Pieces shared by the Triton kernels: the output cast, launch options, the device guard.

Importing this module imports triton; only the kernel modules import it, and only the
dispatch layer imports those (lazily), so ``import hf_zero_kernels`` works without triton.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl

# Every launch passes these. enable_fp_fusion=False keeps the compiled kernel to the exact
# op sequence written (no a*b+c -> fma contraction), which is what the interpreter runs and
# what the references compute: a test that passes under TRITON_INTERPRET=1 then describes
# the GPU bits too. These kernels are bandwidth-bound, so fusing would buy no time. Passing
# it explicitly also pins the behaviour across Triton's planned change of default (3.10).
LAUNCH_OPTIONS: dict[str, Any] = {"enable_fp_fusion": False}

TORCH_TO_TL_FLOAT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def fp32_to_bf16_rtne(x):
    """fp32 -> bf16 rounding to nearest, ties to even: the bits torch's ``.to(torch.bfloat16)``
    produces. Done on the integer bits because the interpreter's own fp32 -> bf16 cast
    truncates, so ``x.to(tl.bfloat16)`` would give different bits on CPU than on a GPU.
    """
    bits = x.to(tl.uint32, bitcast=True)
    # add 0x7FFF plus the lowest kept bit, then drop the low 16 bits: ties go to even
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # NaN payloads could carry into the sign bit; torch writes the canonical quiet NaN
    rounded = tl.where(x != x, 0x7FC0, rounded)  # noqa: PLR0124 (NaN test)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to the element type ``dtype`` of the output pointer (RTNE)."""
    if dtype == tl.bfloat16:
        return fp32_to_bf16_rtne(x)
    else:
        return x.to(dtype)


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* CUDA device; make that the tensor's device (a rank's
    buffers need not live on device 0). A no-op for CPU tensors (interpreter)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def flag_view(flag: torch.Tensor) -> torch.Tensor:
    """A bool flag as uint8 (same bytes): pointer loads of ``*i1`` are awkward in Triton."""
    return flag.view(torch.uint8) if flag.dtype == torch.bool else flag


def grid_1d(numel: int, block: int) -> tuple[int]:
    return (triton.cdiv(numel, block),)

