"""Helpers for the kernel tests: sizes, poisoning, bitwise and low-precision comparisons."""

from __future__ import annotations

import torch

# 1 and 7: a single partial block; 1025: one past a 1024-element block; 4231: awkward and
# not divisible by any block size used. BIG (2^16 + 3) runs once per kernel: the
# interpreter executes each program in numpy, so it is the slow case.
SMALL_SIZES = [1, 7, 1025, 4231]
BIG = 2**16 + 3
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOWP_DTYPES = [torch.bfloat16, torch.float16]
INT8_POISON = -128   # the quantizer never writes -128 (symmetric grid)

_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
           torch.float16: torch.int16, torch.int8: torch.int8, torch.uint8: torch.uint8,
           torch.int32: torch.int32, torch.bool: torch.uint8}


def poisoned(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer every element of which is wrong until written (NaN / -128)."""
    if dtype == torch.int8:
        return torch.full((numel,), INT8_POISON, dtype=dtype)
    return torch.full((numel,), float("nan"), dtype=dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF[t.dtype])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    mismatch = (bits(actual) != bits(expected)).nonzero()
    assert mismatch.numel() == 0, f"{what}: {mismatch.numel()} elements differ, first at {mismatch[:5].tolist()}"


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, what: str = "", rtol: float = 1e-6) -> None:
    """Every element within ``rtol`` of the reference, relative to the element or to the
    buffer's largest magnitude (a result that cancels to near zero, p - lr * update,
    keeps the absolute error of its operands; 1 ulp is 1.2e-7 relative)."""
    assert actual.dtype == expected.dtype == torch.float32, what
    finite = expected[torch.isfinite(expected)]
    atol = rtol * finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=max(atol, 1e-30), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def assert_error_within_2x(kernel_out: torch.Tensor, ref_out: torch.Tensor, oracle: torch.Tensor,
                                what: str = "") -> None:
    """Liger-style criterion: the kernel's max error against an fp64 oracle is at most twice
    the reference's own (low-precision or fp32) error, plus a tiny floor for exact cases."""
    assert torch.isfinite(kernel_out).all(), f"{what}: non-finite output (unwritten element?)"
    kernel_err = (kernel_out.double() - oracle).abs().max().item()
    ref_err = (ref_out.double() - oracle).abs().max().item()
    assert kernel_err <= 2 * ref_err + 1e-30, f"{what}: kernel error {kernel_err:.3e} > 2 x reference {ref_err:.3e}"
