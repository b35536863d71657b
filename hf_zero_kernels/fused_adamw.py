"""Fused AdamW step over a flat fp32 master shard, in one pass over memory (Triton).

Per element it reads the gradient (2 or 4 bytes) and master, exp_avg, exp_avg_sq (12) and
writes those three back (12), plus 2 for the optional bf16/fp16 copy of master: 28-30
bytes, where the unfused torch sequence makes about ten passes over these buffers. The
specification is ``fused_adamw_ref.py``; the public entry point is
``hf_zero_kernels.fused_adamw_`` (dispatch.py), which validates the arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_zero_kernels._triton_utils import (
    LAUNCH_OPTIONS,
    cast_for_store,
    device_guard,
    flag_view,
    grid_1d,
)

BLOCK = 1024       # elements per program: 8 per thread at 4 warps, 16-byte fp32 vectors
NUM_WARPS = 4


@triton.jit
def _fused_adamw_kernel(
    master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_lowp_ptr,
    grad_scale_ptr, overflow_ptr,
    numel,
    wd_factor, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size,
    HAS_OVERFLOW: tl.constexpr, HAS_LOWP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # int64: shards may pass 2^31
    numel_live = numel
    if HAS_OVERFLOW:
        # Skip on the device, no host sync: a set flag (nonzero, or NaN, which fails ==)
        # shrinks the live range to 0, so every load and store below is masked off and
        # the skipped step touches nothing but this one flag.
        numel_live = tl.where(tl.load(overflow_ptr) == 0, numel, 0)
    mask = offs < numel_live

    scale = tl.load(grad_scale_ptr)                                  # fp32 scalar
    # g = float(grad) * (1 / loss_scale * clip): upcast is exact, one rounding
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
    p = tl.load(master_ptr + offs, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)

    # The op order (and the two fma) are those of torch's CPU kernels for the reference's
    # calls, so the kernel reproduces fused_adamw_ref bit for bit in almost every element.
    # decoupled weight decay: p = p * (1 - lr * wd)
    p = p * wd_factor
    # m = b1 m + (1 - b1) g, as torch's lerp_(g, 1 - b1): fma(1 - b1, g - m, m)
    m = tl.fma(one_minus_beta1, g - m, m)
    # v = b2 v + (1 - b2) g^2, as mul_(b2).addcmul_(g, g, value=1 - b2): fma((1 - b2) g, g, b2 v)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    # denom = sqrt(v) / sqrt(1 - b2^t) + eps; _rn: IEEE sqrt and division, as torch
    # (Triton's plain sqrt and / lower to approximate instructions on NVIDIA)
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    # p = p - lr / (1 - b1^t) * m / denom, as addcdiv_(m, denom, value=-step_size):
    # p + (value * m) / denom
    p = p + tl.math.div_rn(neg_step_size * m, denom)

    tl.store(master_ptr + offs, p, mask=mask)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    if HAS_LOWP:
        # the model-dtype copy of the updated weight, rounded to nearest even
        tl.store(out_lowp_ptr + offs, cast_for_store(p, out_lowp_ptr.dtype.element_ty), mask=mask)


def fused_adamw_triton(
    master: torch.Tensor,       # 1D fp32, contiguous: updated in place
    grad: torch.Tensor,         # 1D fp32 / bf16 / fp16, same numel
    exp_avg: torch.Tensor,      # 1D fp32: updated in place
    exp_avg_sq: torch.Tensor,   # 1D fp32: updated in place
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: torch.Tensor,               # 1 element fp32
    overflow: torch.Tensor | None = None,   # 1 element, any dtype
    out_lowp: torch.Tensor | None = None,   # 1D bf16 / fp16
) -> None:
    """Launch ``_fused_adamw_kernel``. Arguments as ``fused_adamw_ref``, already validated
    (hf_zero_kernels.fused_adamw_ checks them). The step-dependent factors are computed
    here in float64, as torch does in Python, and passed as fp32 scalars."""
    numel = master.numel()
    if numel == 0:
        return
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    with device_guard(master):
        _fused_adamw_kernel[grid_1d(numel, BLOCK)](
            master, grad, exp_avg, exp_avg_sq,
            out_lowp if out_lowp is not None else master,   # dummy pointer, never stored to
            grad_scale,
            flag_view(overflow) if overflow is not None else grad_scale,   # dummy, never read
            numel,
            1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2,
            bias_correction2**0.5, eps, -(lr / bias_correction1),
            HAS_OVERFLOW=overflow is not None, HAS_LOWP=out_lowp is not None,
            BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )
