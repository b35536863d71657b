"""The public functions: backend choice, argument validation, import without triton, and
an ahead-of-time CUDA compile of every kernel (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hf_zero_kernels as hk
from hf_zero_kernels.dispatch import use_triton

ROOT = Path(__file__).resolve().parents[2]
HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "step": 1}


def adamw_args(numel: int = 1025, grad_dtype: torch.dtype = torch.bfloat16) -> dict:
    return dict(master=torch.randn(numel), grad=torch.randn(numel).to(grad_dtype), exp_avg=torch.zeros(numel),
                exp_avg_sq=torch.zeros(numel), grad_scale=torch.tensor([0.5]), **HYPER)


def run_every_public_function(backend: str) -> dict:
    a = adamw_args()
    hk.fused_adamw_(**a, out_lowp=torch.empty(1025, dtype=torch.bfloat16), backend=backend)
    sumsq, count = hk.sumsq_and_nonfinite([a["grad"], a["master"]], backend=backend)
    q, scales = hk.quantize_int8_blockwise(a["master"], 256, backend=backend)
    deq = hk.dequantize_int8_blockwise(q, scales, block_size=256, dtype=torch.bfloat16, backend=backend)
    return {"master": a["master"], "sumsq": sumsq, "count": count, "q": q, "scales": scales, "deq": deq}


def test_cpu_tensors_use_the_references(launches) -> None:
    auto = run_every_public_function("auto")
    assert not launches, f"auto on CPU tensors launched Triton kernels: {dict(launches)}"
    torch.manual_seed(0)
    forced = run_every_public_function("triton")
    assert set(launches) == {"_fused_adamw_kernel", "_partials_kernel", "_finish_kernel",
                             "_quantize_kernel", "_dequantize_kernel"}
    torch.manual_seed(0)
    ref = run_every_public_function("torch")
    for name in ref:
        torch.testing.assert_close(forced[name], ref[name], rtol=1e-6, atol=1e-6)
    assert auto["q"].dtype == torch.int8 and auto["deq"].dtype == torch.bfloat16


def test_auto_picks_triton_only_when_every_tensor_is_cuda(monkeypatch) -> None:
    import hf_zero_kernels.dispatch as dispatch

    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert not use_triton([cuda, cuda], "auto")   # not verified on a device yet: the torch references
    monkeypatch.setattr(dispatch, "TRITON_VERIFIED_ON_DEVICE", True)
    assert use_triton([cuda, cuda], "auto") == hk.triton_available()
    assert not use_triton([cuda, cpu], "auto")
    assert not use_triton([], "auto")
    assert not use_triton([cuda], "torch")
    with pytest.raises(ValueError, match="backend"):
        use_triton([cpu], "cuda")


@pytest.mark.parametrize("change, match", [
    ({"grad": torch.randn(1024)}, "grad has 1024 elements"),
    ({"master": torch.randn(1025).double()}, "master has dtype"),
    ({"exp_avg": torch.zeros(1025, dtype=torch.bfloat16)}, "exp_avg has dtype"),
    ({"grad": torch.randn(2050)[::2]}, "grad must be contiguous"),
    ({"grad_scale": torch.ones(2)}, "grad_scale must be a 1-element"),
    ({"grad_scale": torch.ones(1, dtype=torch.float64)}, "grad_scale must be fp32"),
    ({"overflow": torch.zeros(3)}, "overflow must be a 1-element"),
    ({"out_lowp": torch.empty(1025)}, "out_lowp has dtype"),
    ({"step": 0}, "step must be an int >= 1"),
    ({"beta2": 1.0}, "invalid betas"),
    ({"lr": -1.0}, "invalid learning rate"),
])
def test_fused_adamw_validates(change, match) -> None:
    with pytest.raises(ValueError, match=match):
        hk.fused_adamw_(**{**adamw_args(), **change})


def test_sumsq_and_quant_validate() -> None:
    with pytest.raises(ValueError, match="dtype"):
        hk.sumsq_and_nonfinite([torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match="out has 3 elements"):
        hk.sumsq_and_nonfinite([torch.zeros(3)], out=torch.empty(3))
    with pytest.raises(ValueError, match="power of two"):
        hk.quantize_int8_blockwise(torch.zeros(10), 100)
    with pytest.raises(ValueError, match="power of two"):
        hk.quantize_int8_blockwise(torch.zeros(10), 8)
    q, scales = hk.quantize_int8_blockwise(torch.randn(100), 16)
    assert scales.numel() == hk.num_quant_blocks(100, 16) == 7
    with pytest.raises(ValueError, match="scales has 7 elements, expected 2"):
        hk.dequantize_int8_blockwise(q, scales, block_size=64)


def test_outputs_can_be_preallocated() -> None:
    x = torch.randn(300)
    q, scales = torch.empty(300, dtype=torch.int8), torch.empty(hk.num_quant_blocks(300, 64))
    rq, rs = hk.quantize_int8_blockwise(x, 64, out=(q, scales))
    assert rq is q and rs is scales
    out = torch.empty(300, dtype=torch.float16)
    assert hk.dequantize_int8_blockwise(q, scales, block_size=64, out=out) is out
    stats = torch.empty(2)
    sumsq, count = hk.sumsq_and_nonfinite([x], out=stats)
    assert sumsq.data_ptr() == stats.data_ptr() and count.data_ptr() == stats.data_ptr() + 4


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_package_imports_and_runs_without_triton() -> None:
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, hf_zero_kernels as hk\n"
            "assert not hk.triton_available()\n"
            "x = torch.randn(100)\n"
            "hk.fused_adamw_(x, torch.randn(100), torch.zeros(100), torch.zeros(100), lr=1e-3, beta1=0.9,"
            " beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, grad_scale=torch.ones(1))\n"
            "hk.sumsq_and_nonfinite([x]); hk.dequantize_int8_blockwise(*hk.quantize_int8_blockwise(x))\n"
            "assert sys.modules['triton'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_clean_env(), timeout=120)


def test_kernels_compile_for_cuda_without_a_gpu(tmp_path) -> None:
    """The interpreter does not check what only the compiler does (constexpr globals,
    types); this compiles every kernel to PTX / cubin for sm_90 in a fresh process."""
    pytest.importorskip("triton")
    env = {**_clean_env(), "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "tests/kernels/_compile_for_cuda.py"], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="only the CPU-only behaviour is checked here")
def test_benchmark_says_no_gpu_and_exits_0() -> None:
    result = subprocess.run([sys.executable, "benchmarks/kernels.py"], check=False, cwd=ROOT, env=_clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout
