"""The kernel cases of ``make gpu-check``: hf_zero_kernels' Triton kernels (compiled on a GPU,
interpreted in ``--device cpu --quick``) against their torch references on the same device,
and the fused AdamW's throughput against torch's fused AdamW as a fraction of the device's
copy bandwidth (benchmarks/kernels.py's timing helpers)."""

from __future__ import annotations

import torch

import hf_zero_kernels as hk
from gpu_check_cases import Row

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


def _adamw_case(device: torch.device, numel: int, grad_dtype: torch.dtype, clip: float,
                overflow_value: float) -> tuple[bool, str]:
    """Three steps through the Triton kernel and through the torch reference from the same
    state; with ``overflow_value`` != 0 the step must leave every buffer untouched."""
    g = torch.Generator().manual_seed(numel)
    state = {k: torch.randn(numel, generator=g).to(device) * s for k, s in (("m", 1.0), ("a", 1e-3), ("v", 1e-6))}
    state["v"] = state["v"].abs()
    runs = {}
    for backend in ("triton", "torch"):
        master, exp_avg, exp_avg_sq = (state[k].clone() for k in ("m", "a", "v"))
        lowp = master.to(torch.bfloat16)
        overflow = torch.tensor([overflow_value], device=device)
        for step in range(1, 4):
            grad = (torch.randn(numel, generator=torch.Generator().manual_seed(step)) * 3).to(device, grad_dtype)
            scale = torch.tensor([clip / 1024.0], dtype=torch.float32, device=device)   # unscale x clip
            hk.fused_adamw_(master, grad, exp_avg, exp_avg_sq, **HYPER, step=step, grad_scale=scale,
                            overflow=overflow, out_lowp=lowp, backend=backend)
        runs[backend] = (master, exp_avg, exp_avg_sq, lowp)
    if overflow_value != 0:
        unchanged = all(torch.equal(runs["triton"][i], state[k]) for i, k in enumerate(("m", "a", "v")))
        return unchanged, "skipped step left buffers untouched" if unchanged else "BUFFERS CHANGED"
    worst = max(float(((a.float() - b.float()).abs() / (b.float().abs() + 1e-12)).max())
                for a, b in zip(runs["triton"][:3], runs["torch"][:3]))
    lowp_ok = torch.equal(runs["triton"][3], runs["triton"][0].to(torch.bfloat16))   # round to nearest even
    return worst <= 1e-5 and lowp_ok, f"max rel diff {worst:.1e}, bf16 copy = rounded master: {lowp_ok}"


def _norm_case(device: torch.device, numel: int, dtype: torch.dtype) -> tuple[bool, str]:
    x = (torch.randn(numel, generator=torch.Generator().manual_seed(1)) * 5).to(device, dtype)
    y = x.clone()
    y[numel // 3] = float("inf")
    y[numel // 2] = float("nan")
    ok, details = True, []
    for tensors, want_bad in (([x], 0), ([x, y], 2)):
        got = hk.sumsq_and_nonfinite(tensors, backend="triton")
        ref = hk.sumsq_and_nonfinite(tensors, backend="torch")
        bad_ok = int(got[1].item()) == int(ref[1].item()) == want_bad
        if want_bad == 0:
            rel = abs(float(got[0]) - float(ref[0])) / float(ref[0])
            ok &= rel <= 1e-4   # fp32 sums of 1e7 squares in different orders
            details.append(f"sumsq rel diff {rel:.1e}")
        ok &= bad_ok
    details.append(f"non-finite counts match: {ok}")
    return ok, ", ".join(details)


def _quant_case(device: torch.device, numel: int, dtype: torch.dtype) -> tuple[bool, str]:
    x = (torch.randn(numel, generator=torch.Generator().manual_seed(2)) * 2).to(device, dtype)
    q_t, s_t = hk.quantize_int8_blockwise(x, 2048, backend="triton")
    q_r, s_r = hk.quantize_int8_blockwise(x, 2048, backend="torch")
    q_diff = int((q_t.int() - q_r.int()).abs().max())
    scales_ok = torch.allclose(s_t, s_r, rtol=1e-6, atol=0)
    d_t = hk.dequantize_int8_blockwise(q_r, s_r, block_size=2048, dtype=dtype, backend="triton")
    d_r = hk.dequantize_int8_blockwise(q_r, s_r, block_size=2048, dtype=dtype, backend="torch")
    deq_ok = torch.equal(d_t, d_r)
    detail = f"int8 max diff {q_diff}, scales equal {scales_ok}, dequant equal {deq_ok}"
    return q_diff <= 1 and scales_ok and deq_ok, detail


def kernel_rows(device: torch.device, quick: bool) -> list[Row]:
    numel = 4231 if quick else 10_000_019   # awkward sizes: a partial last block
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype is torch.float32 else "bf16"
        cases.append((f"fused_adamw_ grad {name}, scale+clip",
                      lambda d=dtype: _adamw_case(device, numel, d, 0.7, 0.0)))
        cases.append((f"fused_adamw_ grad {name}, overflow skip",
                      lambda d=dtype: _adamw_case(device, numel, d, 1.0, 1.0)))
        cases.append((f"sumsq_and_nonfinite {name}", lambda d=dtype: _norm_case(device, numel, d)))
        cases.append((f"int8 quant/dequant {name}", lambda d=dtype: _quant_case(device, numel, d)))
    rows = []
    for name, run in cases:
        try:
            ok, detail = run()
        except Exception as err:   # a compile or launch failure is a result, not a crash of the check
            ok, detail = False, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        rows.append(Row("Triton vs torch reference", f"{name}, {numel:,} elements", detail, "", ok))
    return rows


def throughput_rows(device: torch.device, quick: bool) -> list[Row]:
    """Triton fused AdamW vs torch's fused AdamW (plus the upcast/cast the engine adds around
    it), GB/s of ideal traffic and as a fraction of the measured copy bandwidth."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("hf_zero_bench_kernels", Path(__file__).with_name("kernels.py"))
    bench = importlib.util.module_from_spec(spec)   # benchmarks/kernels.py (not the PyPI 'kernels' package)
    spec.loader.exec_module(bench)

    numel = 4096 if quick else 2**26
    iters = 2 if quick else 20
    copy_gbs = bench.copy_bandwidth_gbs(device, iters, 2**20 if quick else 2**30)
    rows = []
    for label, ideal, fn in bench.adamw_rows(numel, device, "triton"):
        if "foreach" in label or "unfused" in label:
            continue
        ms = bench.time_ms(fn, iters, device)
        gbs = ideal / ms / 1e6
        rows.append(Row("AdamW throughput", label.strip(), f"{gbs:,.0f} GB/s ({ms:.3f} ms)",
                        f"{100 * gbs / copy_gbs:.0f}% of copy {copy_gbs:,.0f} GB/s", None))
    return rows
