"""Blockwise symmetric int8 quantize / dequantize for communication (Triton).

Each program handles ROWS quantization blocks as a (ROWS, block_size) tile, so small
blocks still give every program a few thousand elements. Quantize reads x once and
writes 1 byte per element plus 4 bytes per block; dequantize the reverse. Specification
and error bound: ``quant_int8_ref.py`` (and docs/kernels.md); public entry points:
``hf_zero_kernels.quantize_int8_blockwise`` / ``dequantize_int8_blockwise``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_zero_kernels._triton_utils import LAUNCH_OPTIONS, cast_for_store, device_guard

TILE = 4096        # elements per program (ROWS * block_size), when block_size allows
NUM_WARPS = 4
QMAX = tl.constexpr(127.0)
FLT_MAX = tl.constexpr(3.4028234663852886e38)   # jit globals must be constexpr


def _rows(block_size: int) -> int:
    return max(1, TILE // block_size)


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, scale_ptr, numel, num_blocks,
                     BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)      # (R,) block ids
    offs = rows[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]  # (R, S)
    # rows past num_blocks start past numel, so this one mask covers both edges
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)        # exact upcast
    # a block with inf / NaN (NaN: x != x; inf: |x| > FLT_MAX) is marked bad
    num_bad = tl.sum(((x != x) | (tl.abs(x) > FLT_MAX)).to(tl.int32), axis=1)  # noqa: PLR0124 (R,)
    # s_b = max|x_b| / 127 (IEEE division, as the reference); NaN for a bad block
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), QMAX)
    scale = tl.where(num_bad > 0, float("nan"), scale)
    # q = clamp(floor(x / s_b + 1/2), -127, 127); all-zero and bad blocks divide by 1
    # and are then set to q = 0 (no division by zero, no NaN -> int8 conversion)
    live = scale > 0                                                       # False for NaN
    safe = tl.where(live, scale, 1.0)
    q = tl.floor(tl.math.div_rn(x, safe[:, None]) + 0.5)
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    q = tl.where(live[:, None], q, 0.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < num_blocks)


@triton.jit
def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, numel, num_blocks,
                       BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)      # (R,)
    offs = rows[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]  # (R, S)
    mask = offs < numel
    scale = tl.load(scale_ptr + rows, mask=rows < num_blocks, other=0.0)  # (R,) fp32
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)           # exact
    # out = q * s_b in fp32, rounded once to the output dtype (nearest even)
    deq = q * scale[:, None]
    tl.store(out_ptr + offs, cast_for_store(deq, out_ptr.dtype.element_ty), mask=mask)


def quantize_int8_blockwise_triton(
    x: torch.Tensor,             # 1D contiguous fp32 / bf16 / fp16
    block_size: int,             # power of two
    q: torch.Tensor,             # 1D int8, x.numel(): written whole
    scales: torch.Tensor,        # 1D fp32, ceil(numel / block_size): written whole
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_quantize_kernel``; arguments already validated by the public function."""
    numel = x.numel()
    if numel == 0:
        return q, scales
    num_blocks = triton.cdiv(numel, block_size)
    rows = _rows(block_size)
    with device_guard(x):
        _quantize_kernel[(triton.cdiv(num_blocks, rows),)](
            x, q, scales, numel, num_blocks,
            BLOCK_SIZE=block_size, ROWS=rows, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )
    return q, scales


def dequantize_int8_blockwise_triton(
    q: torch.Tensor,             # 1D contiguous int8
    scales: torch.Tensor,        # 1D fp32, ceil(q.numel() / block_size)
    block_size: int,             # power of two, as at quantization
    out: torch.Tensor,           # 1D fp32 / bf16 / fp16, q.numel(): written whole
) -> torch.Tensor:
    """Launch ``_dequantize_kernel``; arguments already validated by the public function."""
    numel = q.numel()
    if numel == 0:
        return out
    num_blocks = triton.cdiv(numel, block_size)
    rows = _rows(block_size)
    with device_guard(q):
        _dequantize_kernel[(triton.cdiv(num_blocks, rows),)](
            q, scales, out, numel, num_blocks,
            BLOCK_SIZE=block_size, ROWS=rows, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )
    return out
