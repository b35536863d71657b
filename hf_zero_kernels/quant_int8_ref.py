"""Reference blockwise symmetric int8 quantization (ZeRO++-style, for communication): the
specification of ``quant_int8``, the CPU fallback and the test oracle.

A flat buffer of numel elements is cut into blocks of ``block_size`` consecutive elements
(the last one may be short). Block b gets one fp32 scale s_b = max|x in b| / 127 and
q_i = clamp(floor(x_i / s_b + 1/2), -127, 127) (round half up: cheap and bit-identical on
every backend; -128 is never used, so the grid is symmetric). Dequantization is q_i * s_b.

Error bound (see docs/kernels.md for the derivation), for the fp32 output:
    |x_i - deq_i| <= s_b * (1/2 + 2^-16)            (s_b = the stored scale ~ max|x_b| / 127)
i.e. about max|x_b| / 254; a bf16 / fp16 output adds its own rounding, |deq_i| * 2^-8 / 2^-11
(plus 2^-25 absolute for fp16 results in its subnormal range, below 6.1e-5).
A block whose scale underflows (max|x_b| < 127 * 2^-149) quantizes to 0, error <= max|x_b|.
A block holding any inf or NaN gets scale NaN and q = 0, so it dequantizes to all NaN:
the overflow stays visible after communication.
"""

from __future__ import annotations

import torch

QMAX = 127


def _blocks(flat: torch.Tensor, block_size: int, fill: float = 0) -> torch.Tensor:
    """(num_blocks, block_size) view of ``flat`` padded with ``fill`` to whole blocks."""
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.cat([flat, flat.new_full((pad,), fill)])
    return flat.view(-1, block_size)


def quantize_int8_blockwise_ref(
    x: torch.Tensor,             # 1D fp32 / bf16 / fp16 (fp64 allowed)
    block_size: int,
    q: torch.Tensor,             # 1D int8, x.numel(): written whole
    scales: torch.Tensor,        # 1D fp32, ceil(numel / block_size): written whole
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, scales = quantize(x) as specified in the module docstring; returns (q, scales)."""
    if x.numel() == 0:
        return q, scales
    xb = _blocks(x.to(torch.float32), block_size)                # (B, S) fp32, exact upcast
    bad = ~torch.isfinite(xb).all(dim=1, keepdim=True)            # (B, 1)
    scale = xb.abs().amax(dim=1, keepdim=True) / QMAX             # (B, 1) IEEE division
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    # scale 0 (all-zero block) or NaN (bad block): divide by 1, the q is overwritten below
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    qb = torch.floor(xb / safe + 0.5).clamp_(-QMAX, QMAX)
    qb = torch.where(bad | (scale == 0), torch.zeros_like(qb), qb)
    q.copy_(qb.view(-1)[: x.numel()])
    scales.copy_(scale.view(-1))
    return q, scales


def dequantize_int8_blockwise_ref(
    q: torch.Tensor,             # 1D int8
    scales: torch.Tensor,        # 1D fp32, ceil(q.numel() / block_size)
    block_size: int,
    out: torch.Tensor,           # 1D fp32 / bf16 / fp16 (fp64 for the oracle), q.numel(): written whole
) -> torch.Tensor:
    """out_i = q_i * s_(i // block_size), computed in fp32 (fp64 for an fp64 ``out``) and
    rounded once to out's dtype (nearest even)."""
    if q.numel() == 0:
        return out
    compute = torch.float64 if out.dtype == torch.float64 else torch.float32
    qb = _blocks(q.to(compute), block_size)                       # (B, S)
    deq = qb * scales.to(compute).view(-1, 1)                     # (B, S)
    out.copy_(deq.view(-1)[: q.numel()])
    return out
