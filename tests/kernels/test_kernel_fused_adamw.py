"""fused_adamw: the reference against torch.optim.AdamW, the Triton kernel (interpreted)
against the reference, and the skip-on-overflow path."""

from __future__ import annotations

import random

import pytest
import torch
from kernel_testing import (
    BIG,
    FLOAT_DTYPES,
    LOWP_DTYPES,
    SMALL_SIZES,
    assert_bits_equal,
    assert_close_fp32,
    assert_error_within_2x,
    poisoned,
)

from hf_zero_kernels.fused_adamw_ref import fused_adamw_ref

fused_adamw = pytest.importorskip("hf_zero_kernels.fused_adamw")


def hyper(step: int | None = None, weight_decay: float | None = None) -> dict:
    """Fresh random hyperparameters in the usual ranges."""
    return {"lr": 10 ** random.uniform(-4, -2), "beta1": random.choice([0.9, 0.8]),
                "beta2": random.choice([0.999, 0.95]), "eps": random.choice([1e-8, 1e-6]),
                "weight_decay": random.choice([0.0, 0.01, 0.1]) if weight_decay is None else weight_decay,
                "step": random.randint(1, 2000) if step is None else step}


def state(numel: int, grad_dtype: torch.dtype) -> dict:
    """A master shard mid-training: weights ~N(0,1), moments of matching magnitude."""
    return {"master": torch.randn(numel), "grad": (torch.randn(numel) * 3).to(grad_dtype),
                "exp_avg": torch.randn(numel) * 0.1, "exp_avg_sq": torch.rand(numel) * 0.01 + 1e-6}


def clone(s: dict, dtype: torch.dtype | None = None) -> dict:
    return {k: v.clone() if dtype is None else v.to(dtype) for k, v in s.items()}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_reference_matches_torch_adamw(foreach: bool, weight_decay: float) -> None:
    numel, lr, betas, eps = 4231, 3e-3, (0.9, 0.999), 1e-8
    param = torch.nn.Parameter(torch.randn(numel))
    opt = torch.optim.AdamW([param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
    master, exp_avg, exp_avg_sq = param.detach().clone(), torch.zeros(numel), torch.zeros(numel)
    for step in range(1, 6):
        grad = torch.randn(numel)
        grad_scale = torch.tensor([random.uniform(0.1, 2.0)])
        param.grad = grad * grad_scale          # what torch sees: the already scaled gradient
        opt.step()
        fused_adamw_ref(master, grad, exp_avg, exp_avg_sq, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
                        weight_decay=weight_decay, step=step, grad_scale=grad_scale)
        torch_state = opt.state[param]
        assert_close_fp32(master, param.detach(), f"param, step {step}")
        assert_close_fp32(exp_avg, torch_state["exp_avg"], f"exp_avg, step {step}")
        assert_close_fp32(exp_avg_sq, torch_state["exp_avg_sq"], f"exp_avg_sq, step {step}")


def check_against_reference(numel: int, grad_dtype: torch.dtype, lowp_dtype: torch.dtype | None,
                            launches) -> None:
    s, h = state(numel, grad_dtype), hyper()
    grad_scale = torch.tensor([random.uniform(0.01, 1.0)])
    grad_before = s["grad"].clone()
    ref, ker = clone(s), clone(s)
    ref_lowp = torch.empty(numel, dtype=lowp_dtype) if lowp_dtype else None
    ker_lowp = poisoned(numel, lowp_dtype) if lowp_dtype else None

    fused_adamw_ref(**ref, **h, grad_scale=grad_scale, out_lowp=ref_lowp)
    fused_adamw.fused_adamw_triton(**ker, **h, grad_scale=grad_scale, out_lowp=ker_lowp,
                                   overflow=torch.zeros(1, dtype=torch.uint8))
    assert launches["_fused_adamw_kernel"] == 1

    # In-place outputs cannot be poisoned; instead every element is compared with the
    # reference. The moments change in (essentially) every element, so an unwritten one
    # would show; a master element may legitimately keep its value (update < half an ulp).
    for name in ("exp_avg", "exp_avg_sq"):
        assert (ref[name] != s[name]).double().mean() > 0.9, f"{name}: the step changed too little"
    for name in ("master", "exp_avg", "exp_avg_sq"):
        assert_close_fp32(ker[name], ref[name], name)
    assert_bits_equal(ker["grad"], grad_before, "grad is read only")
    if lowp_dtype:
        oracle = clone(s, torch.float64)
        fused_adamw_ref(**oracle, **h, grad_scale=grad_scale.double())
        assert_error_within_2x(ker_lowp, ref_lowp, oracle["master"], f"out_lowp {lowp_dtype}")


@pytest.mark.parametrize("lowp_dtype", [None, *LOWP_DTYPES], ids=str)
@pytest.mark.parametrize("grad_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("numel", SMALL_SIZES)
def test_kernel_matches_reference(numel, grad_dtype, lowp_dtype, launches) -> None:
    check_against_reference(numel, grad_dtype, lowp_dtype, launches)


def test_kernel_matches_reference_big(launches) -> None:
    check_against_reference(BIG, torch.bfloat16, torch.bfloat16, launches)


def test_kernel_fp32_outputs_near_fp64_oracle(launches) -> None:
    """The kernel's fp32 results sit as close to exact arithmetic as the reference's."""
    s, h = state(4231, torch.float32), hyper()
    grad_scale = torch.tensor([0.37])
    ker, ref, oracle = clone(s), clone(s), clone(s, torch.float64)
    fused_adamw.fused_adamw_triton(**ker, **h, grad_scale=grad_scale)
    fused_adamw_ref(**ref, **h, grad_scale=grad_scale)
    fused_adamw_ref(**oracle, **h, grad_scale=grad_scale.double())
    for name in ("master", "exp_avg", "exp_avg_sq"):
        assert_error_within_2x(ker[name], ref[name], oracle[name], name)


@pytest.mark.parametrize("flag", [
    torch.tensor([True]), torch.tensor([1], dtype=torch.uint8), torch.tensor([3], dtype=torch.int32),
    torch.tensor([1.0]), torch.tensor([float("inf")]), torch.tensor([float("nan")]),
], ids=["bool", "uint8", "int32", "fp32", "inf", "nan"])
def test_overflow_skips_and_leaves_every_buffer_bit_identical(flag, launches) -> None:
    numel = 4231
    s = state(numel, torch.bfloat16)
    s["grad"][17] = float("inf")                       # what would set the flag
    out_lowp = poisoned(numel, torch.bfloat16)
    out_lowp[::2] = 1.5                                 # NaN and non-NaN bits must both survive
    before = clone({**s, "out_lowp": out_lowp})
    fused_adamw.fused_adamw_triton(**s, **hyper(), grad_scale=torch.tensor([0.5]), overflow=flag,
                                   out_lowp=out_lowp)
    assert launches["_fused_adamw_kernel"] == 1
    for name, t in {**s, "out_lowp": out_lowp}.items():
        assert_bits_equal(t, before[name], name)
    # the reference agrees (it reads the flag on the host)
    ref = clone(before)
    fused_adamw_ref(**{k: ref[k] for k in s}, **hyper(), grad_scale=torch.tensor([0.5]), overflow=flag,
                    out_lowp=ref["out_lowp"])
    for name in ref:
        assert_bits_equal(ref[name], before[name], f"reference {name}")


@pytest.mark.parametrize("flag_dtype", [torch.bool, torch.float32])
def test_clear_overflow_flag_steps(flag_dtype, launches) -> None:
    s, h = state(1025, torch.float16), hyper()
    ref, ker = clone(s), clone(s)
    fused_adamw_ref(**ref, **h, grad_scale=torch.tensor([1.0]))
    fused_adamw.fused_adamw_triton(**ker, **h, grad_scale=torch.tensor([1.0]),
                                   overflow=torch.zeros(1, dtype=flag_dtype))
    for name in ("master", "exp_avg", "exp_avg_sq"):
        assert_close_fp32(ker[name], ref[name], name)


def test_several_steps_track_the_reference(launches) -> None:
    """Errors do not accumulate: 5 consecutive steps (step 1..5) from zero moments."""
    numel = 4231
    master = torch.randn(numel)
    ref = {"master": master.clone(), "exp_avg": torch.zeros(numel), "exp_avg_sq": torch.zeros(numel)}
    ker = clone(ref)
    h = hyper(weight_decay=0.01)
    for step in range(1, 6):
        grad = torch.randn(numel).to(torch.bfloat16)
        grad_scale = torch.tensor([random.uniform(0.1, 1.0)])
        h["step"] = step
        fused_adamw_ref(**ref, grad=grad, **h, grad_scale=grad_scale)
        fused_adamw.fused_adamw_triton(**ker, grad=grad, **h, grad_scale=grad_scale)
    assert launches["_fused_adamw_kernel"] == 5
    for name, expected in ref.items():
        assert_close_fp32(ker[name], expected, name)
