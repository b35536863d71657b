"""The gradient pass of the CPU update: a sub-group's gradient slices as host fp32 tensors,
with the unscale x clip coefficient applied in as few passes over memory as stay exact.

[Note: folding the coefficient]
Every backend updates from ``grad * c``, where c = clip coefficient / (grad divisor x loss
scale) is an fp32 scalar known once the global norm is. The 'none' backend multiplies in
place: one more pass over the gradient, 8 bytes per parameter on top of the update's 28
(read param, grad, m, v; write param, m, v), so a step made that way reaches at most
28/36 = 0.78 of the bandwidth limit. The CPU update skips the pass where the result stays
bit-identical to that multiply:

- c == 1 (one rank, no loss scaling, clipping not triggered): x * 1 == x for every fp32 x,
  so fp32 host gradients go to the kernel as they are: 28 bytes per parameter.
- c == 2**k, k in [-126, 126] (1/world_size on 2, 4, 8... ranks with clipping not
  triggered, also times a power-of-two fp16 loss scale): torch's fused kernel divides each
  gradient by its ``grad_scale`` argument as it streams it. 1/c is then exact, and x / 2**-k
  and x * 2**k are both the correctly rounded value of the same real number: same bits.
  The kernel stores the divided gradient back, so 32 bytes per parameter.
- any other c (clipping triggered, 3 ranks, ...): the kernel's x / fl(1/c) differs from
  x * c in the last bit (41% of the elements for c = 0.37), and offloaded runs are tested
  to be bit-identical to the 'none' backend (tests/test_offload.py), so the multiply stays.

Groups that chose ``fused=False`` take no ``grad_scale`` (foreach / loop kernels) and
multiply. Non-fp32 or device gradients need a host fp32 copy anyway: ``.to(host, fp32)``
is that one op, and c is applied to the copy as above. A single mixed-dtype
``torch.mul(bf16_grad, c, out=fp32)`` is exact too but not vectorised by torch: 146 ms for
50M elements here against 34 ms for a copy plus an in-place multiply, so it is not used.
What the copy really costs is a fresh allocation (page faults: 115 ms against 19 ms for a
copy into a reused buffer), so the step loop passes a staging buffer of one sub-group,
allocated at the start of the step and reused by every sub-group (the kernel has consumed
a sub-group's gradients before the next one is staged), then freed: no memory between
steps, one sub-group of faults per step instead of one per sub-group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def exact_reciprocal(c: float) -> float | None:
    """1/c when dividing by it gives the same fp32 bits as multiplying by ``c`` (``c`` a
    power of two whose reciprocal is a normal fp32 too), else None."""
    if not (math.isfinite(c) and c > 0):
        return None
    mantissa, exponent = math.frexp(c)     # c = mantissa * 2**exponent, mantissa in [0.5, 1)
    if mantissa != 0.5 or not -126 <= exponent - 1 <= 126:
        return None
    return 1.0 / c


@dataclass(frozen=True)
class GradPass:
    """How one step's coefficient reaches the CPU update ([Note: folding the coefficient])."""

    coefficient: torch.Tensor          # (1,) fp32 on the host: c
    multiply: bool                     # c != 1: some pass must apply it
    kernel_divisor: float | None       # 1/c when the fused kernel may apply c exactly

    @classmethod
    def for_step(cls, coefficient: torch.Tensor, fold: bool = True) -> "GradPass":
        """``fold=False``: always multiply, as the 'none' backend does (the simple version,
        kept for comparison in benchmarks/offload.py)."""
        if not fold:
            return cls(coefficient, True, None)
        c = float(coefficient.item())      # the coefficient is on the host already: no sync
        return cls(coefficient, c != 1.0, exact_reciprocal(c) if c != 1.0 else None)

    def divisor_for(self, kernel_fused: bool) -> float | None:
        """The ``grad_scale`` to hand the Adam kernel of a group (None: none)."""
        return self.kernel_divisor if kernel_fused else None

    def host_grad(self, grad: torch.Tensor, host: torch.device, divided_in_kernel: bool,
                  staging: torch.Tensor | None = None) -> torch.Tensor:
        """``grad`` (1D slice, any dtype/device) as an fp32 tensor on ``host`` (the parameters'
        device for a device sub-group, [Note: partial offload]) holding ``grad * c``,
        or ``grad`` alone when the kernel divides by 1/c. ``staging``: a host fp32 tensor of
        ``grad``'s size to copy a non-fp32 or device gradient into (default: a fresh one)."""
        # fp32 host gradients come back as themselves and are scaled in place, as the 'none'
        # backend does; others are copied to host fp32 (the same bits either way).
        if staging is not None and (grad.dtype != torch.float32 or grad.device != host):
            out = staging.copy_(grad)
        else:
            out = grad.to(device=host, dtype=torch.float32)
        if self.multiply and not divided_in_kernel:   # (a device sub-group's slices: c on their device)
            out.mul_(self.coefficient if out.device == self.coefficient.device else self.coefficient.to(out.device))
        return out
