"""Fused kernels for the ZeRO hot paths: Triton for CUDA tensors, torch references elsewhere.

One file per kernel (``fused_adamw``, ``sumsq_nonfinite``, ``quant_int8``) with its torch
reference beside it (``<name>_ref.py``: specification, CPU fallback, test oracle).
``dispatch`` holds the public functions re-exported here and imports triton lazily, so
this package imports without triton. Documentation: docs/kernels.md.
"""

from hf_zero_kernels.dispatch import (
    DEFAULT_QUANT_BLOCK_SIZE,
    Backend,
    dequantize_int8_blockwise,
    fused_adamw_,
    num_quant_blocks,
    quantize_int8_blockwise,
    sumsq_and_nonfinite,
    triton_available,
)

__all__ = [
    "DEFAULT_QUANT_BLOCK_SIZE",
    "Backend",
    "dequantize_int8_blockwise",
    "fused_adamw_",
    "num_quant_blocks",
    "quantize_int8_blockwise",
    "sumsq_and_nonfinite",
    "triton_available",
]
