"""sumsq_and_nonfinite: the Triton kernels (interpreted) against the reference and an fp64
oracle, single buffers and lists, with and without non-finite values."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    BIG,
    FLOAT_DTYPES,
    SMALL_SIZES,
    assert_bits_equal,
    assert_close_fp32,
    poisoned,
)

from hf_zero_kernels.sumsq_nonfinite_ref import sumsq_and_nonfinite_ref

sumsq = pytest.importorskip("hf_zero_kernels.sumsq_nonfinite")


def run_all(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kernel, reference, fp64 oracle) 2-element outputs; the kernel's was poisoned."""
    ker = poisoned(2, torch.float32)
    returned = sumsq.sumsq_and_nonfinite_triton(tensors, ker)
    assert returned[0].data_ptr() == ker.data_ptr() and returned[1].data_ptr() == ker.data_ptr() + 4
    ref = torch.empty(2)
    sumsq_and_nonfinite_ref(tensors, ref)
    oracle = torch.empty(2, dtype=torch.float64)
    sumsq_and_nonfinite_ref([t.double() for t in tensors], oracle)
    return ker, ref, oracle


def check_finite(tensors: list[torch.Tensor], launches) -> None:
    ker, ref, oracle = run_all(tensors)
    assert launches["_finish_kernel"] == 1
    assert launches["_partials_kernel"] == sum(t.numel() > 0 for t in tensors)
    assert ker[1].item() == 0.0 and ref[1].item() == 0.0
    assert_close_fp32(ker[:1], ref[:1], "sumsq vs reference")
    # fp32 result vs exact arithmetic: the blocked tree sum is as good as torch's
    kernel_err = abs(ker[0].item() - oracle[0].item())
    assert kernel_err <= max(2 * abs(ref[0].item() - oracle[0].item()), 2e-7 * oracle[0].item())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("numel", SMALL_SIZES + [4097])   # 4097: one past the 4096 block
def test_single_buffer(numel, dtype, launches) -> None:
    check_finite([(torch.randn(numel) * 4).to(dtype)], launches)


def test_list_of_buffers_mixed_dtypes_and_big(launches) -> None:
    tensors = [torch.randn(n).to(dt) for n, dt in
               [(BIG, torch.bfloat16), (0, torch.float32), (7, torch.float16), (4231, torch.float32),
                (1, torch.bfloat16)]]
    check_finite(tensors, launches)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nonfinite_count_and_propagation(dtype, launches) -> None:
    tensors = [torch.randn(n).to(dtype) for n in (4231, 7, 8193)]
    planted = {(0, 0): float("inf"), (0, 4095): float("nan"), (0, 4096): -float("inf"),
               (0, 4230): float("nan"), (1, 3): float("inf"), (2, 8192): -float("inf")}
    for (i, j), value in planted.items():
        tensors[i][j] = value
    ker, ref, _ = run_all(tensors)
    assert ker[1].item() == ref[1].item() == len(planted)
    assert torch.isnan(ker[0]) and torch.isnan(ref[0])     # a NaN anywhere wins


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # numpy, interpreting inf * inf
def test_inf_only_and_square_overflow(launches) -> None:
    """inf (no NaN) gives sumsq = inf; finite values whose squares overflow fp32 also give
    inf but a zero count: the count, not sumsq, is the non-finite signal."""
    x = torch.randn(1025)
    x[1024] = float("inf")
    ker, ref, _ = run_all([x])
    assert ker[0].item() == ref[0].item() == float("inf") and ker[1].item() == ref[1].item() == 1
    big = torch.full((7,), 1e30)
    ker, ref, _ = run_all([big])
    assert ker[0].item() == ref[0].item() == float("inf") and ker[1].item() == ref[1].item() == 0


@pytest.mark.parametrize("tensors", [[], [torch.empty(0)], [torch.empty(0, dtype=torch.bfloat16)] * 2])
def test_empty_writes_zeros(tensors, launches) -> None:
    ker, ref, _ = run_all(tensors)
    assert ker.tolist() == ref.tolist() == [0.0, 0.0]


def test_bit_reproducible(launches) -> None:
    """No atomics: the same input gives the same bits every time."""
    tensors = [torch.randn(BIG // 4).to(torch.bfloat16), torch.randn(4231)]
    first, second = poisoned(2, torch.float32), poisoned(2, torch.float32)
    sumsq.sumsq_and_nonfinite_triton(tensors, first)
    sumsq.sumsq_and_nonfinite_triton(tensors, second)
    assert_bits_equal(second, first)
