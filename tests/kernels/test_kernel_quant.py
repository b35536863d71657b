"""Blockwise int8 quantize / dequantize: the Triton kernels (interpreted) against the
reference bit for bit, the documented round-trip bound, and non-finite blocks."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    BIG,
    FLOAT_DTYPES,
    INT8_POISON,
    LOWP_DTYPES,
    SMALL_SIZES,
    assert_bits_equal,
    assert_error_within_2x,
    poisoned,
)

from hf_zero_kernels.quant_int8_ref import (
    dequantize_int8_blockwise_ref,
    quantize_int8_blockwise_ref,
)

quant = pytest.importorskip("hf_zero_kernels.quant_int8")

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
HALF_SMALLEST_SUBNORMAL = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}


def sample(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Gradient-like data: heavy-tailed magnitudes, an all-zero stretch, some tiny values."""
    x = torch.randn(numel) * torch.rand(numel).pow(4) * 10
    x[numel // 3: numel // 3 + 40] = 0.0
    x[numel // 2:: 97] *= 1e-6
    return x.to(dtype)


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def quantize_both(x: torch.Tensor, block_size: int):
    nb = num_blocks(x.numel(), block_size)
    kq, ks = poisoned(x.numel(), torch.int8), poisoned(nb, torch.float32)
    quant.quantize_int8_blockwise_triton(x, block_size, kq, ks)
    rq, rs = torch.empty_like(kq), torch.empty_like(ks)
    quantize_int8_blockwise_ref(x, block_size, rq, rs)
    return kq, ks, rq, rs


def check_round_trip(x: torch.Tensor, block_size: int, launches) -> None:
    numel = x.numel()
    kq, ks, rq, rs = quantize_both(x, block_size)
    assert launches["_quantize_kernel"] == 1
    assert (kq != INT8_POISON).all(), "an int8 element was not written"
    assert_bits_equal(kq, rq, "q")
    assert_bits_equal(ks, rs, "scales")
    scale_per_elem = ks.repeat_interleave(block_size)[:numel].double()
    exact = (kq.double() * scale_per_elem)                        # fp64 oracle of q * s
    for out_dtype in FLOAT_DTYPES:
        kd = poisoned(numel, out_dtype)
        quant.dequantize_int8_blockwise_triton(kq, ks, block_size, kd)
        rd = torch.empty(numel, dtype=out_dtype)
        dequantize_int8_blockwise_ref(rq, rs, block_size, rd)
        assert_bits_equal(kd, rd, f"dequantized {out_dtype}")
        if out_dtype in LOWP_DTYPES:
            assert_error_within_2x(kd, rd, exact, f"dequantized {out_dtype}")
        # documented bound: |x - deq| <= s_b (1/2 + 2^-16) + u_out |deq| + eta_out / 2
        err = (x.double() - kd.double()).abs()
        bound = (scale_per_elem * (0.5 + 2.0**-16) + UNIT_ROUNDOFF[out_dtype] * kd.double().abs()
                 + HALF_SMALLEST_SUBNORMAL[out_dtype])
        worst = (err - bound).max().item()
        assert worst <= 0, f"{out_dtype}: round-trip error exceeds the documented bound by {worst:.3e}"
    assert launches["_dequantize_kernel"] == len(FLOAT_DTYPES)


@pytest.mark.parametrize("block_size", [16, 256, 2048])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("numel", SMALL_SIZES)
def test_round_trip(numel, dtype, block_size, launches) -> None:
    check_round_trip(sample(numel, dtype), block_size, launches)


def test_round_trip_big_and_largest_block(launches) -> None:
    check_round_trip(sample(BIG, torch.bfloat16), 16384, launches)


def test_bound_is_tight_enough_to_mean_something(launches) -> None:
    """The worst observed error approaches the half-step bound (the bound is not vacuous)."""
    x = torch.randn(4231)
    kq, ks, _, _ = quantize_both(x, 256)
    deq = kq.float() * ks.repeat_interleave(256)[:4231]
    ratio = ((x - deq).abs() / ks.repeat_interleave(256)[:4231]).max().item()
    assert 0.45 < ratio <= 0.5 + 2.0**-16


def test_scale_and_extremes(launches) -> None:
    """s_b = max|x_b| / 127, the extreme element maps to +-127, zero blocks to 0 / 0."""
    x = torch.zeros(64)
    x[0:16] = torch.linspace(-3.0, 1.0, 16)     # block 0: max |x| = 3 at a negative value
    x[16:32] = 1e-3                              # block 1: constant
    kq, ks, _, _ = quantize_both(x, 16)
    assert ks[0].item() == torch.tensor(3.0 / 127, dtype=torch.float32).item()
    assert kq[0].item() == -127 and kq[16:32].eq(127).all()
    assert ks[2:].eq(0).all() and kq[32:].eq(0).all()


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_nonfinite_block_dequantizes_to_nan(bad, launches) -> None:
    x = torch.randn(4231)
    x[2050] = bad                                 # block 1 of 2048
    kq, ks, rq, _rs = quantize_both(x, 2048)
    assert_bits_equal(kq, rq, "q")
    assert torch.isnan(ks[1]) and torch.isfinite(ks[[0, 2]]).all()
    assert kq[2048:4096].eq(0).all()
    deq = poisoned(4231, torch.bfloat16)
    quant.dequantize_int8_blockwise_triton(kq, ks, 2048, deq)
    assert torch.isnan(deq[2048:4096]).all() and torch.isfinite(deq[:2048]).all() and torch.isfinite(deq[4096:]).all()
