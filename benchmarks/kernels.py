"""Bandwidth of the hf_zero_kernels Triton kernels against the unfused torch sequences.

    python benchmarks/kernels.py [--numel 67108864] [--iters 20] [--block-size 2048]

Needs a CUDA GPU; on a CPU-only machine it says so and exits 0 (``--smoke`` instead runs
every row on CPU through Triton's interpreter with a tiny buffer, to check this script
itself; its timings mean nothing).

Each row times one operation over a flat buffer of ``--numel`` elements (median of
``--iters`` runs, CUDA events, after a warm-up that compiles). "ideal bytes" is what the
fused operation must move: every input read once and every output written once. GB/s is
ideal bytes / time for every row, so an unfused baseline that moves more memory shows up
as a lower effective rate; "% copy" compares it with the device's measured copy
bandwidth (``dst.copy_(src)`` of 1 GiB, counted as read + write). Baselines: the torch
reference run on the GPU (the unfused sequence of torch ops the CPU path uses), and for
AdamW the engine's current step: upcast-and-scale the gradient, torch.optim.AdamW with
fused=True (or foreach=True), cast the master back to bf16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_zero_kernels as hk

HYPER = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


def time_ms(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` (one warm-up call first, which compiles)."""
    fn()
    if device.type != "cuda":   # --smoke: wall clock, meaningless but exercises the code
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, iters: int, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_ms(lambda: dst.copy_(src), iters, device) / 1e6


def adamw_rows(numel: int, device: torch.device, backend: str) -> list[tuple[str, int, Callable]]:
    """Fused step over an fp32 master with a bf16 gradient and the bf16 weight copy."""
    master, exp_avg, exp_avg_sq = (torch.randn(numel, device=device) * s for s in (1.0, 1e-3, 1e-6))
    exp_avg_sq = exp_avg_sq.abs()
    grad = torch.randn(numel, device=device).to(torch.bfloat16)
    lowp = master.to(torch.bfloat16)
    grad_scale = torch.tensor([0.5], device=device)
    overflow = torch.zeros(1, dtype=torch.bool, device=device)
    ideal = numel * (2 + 3 * 4 * 2 + 2)   # read grad bf16, read+write p/m/v fp32, write bf16 copy
    step = [0]

    def run(chosen: str) -> Callable[[], None]:
        def go() -> None:
            step[0] += 1
            hk.fused_adamw_(master, grad, exp_avg, exp_avg_sq, **HYPER, step=step[0], grad_scale=grad_scale,
                            overflow=overflow, out_lowp=lowp, backend=chosen)
        return go

    def torch_optimizer(**flags: bool) -> Callable[[], None]:
        param = torch.nn.Parameter(master.clone())
        opt = torch.optim.AdamW([param], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                                eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], **flags)

        def go() -> None:   # what hf_zero's MasterWeights + inner optimizer do today
            param.grad = grad.to(torch.float32).mul_(grad_scale)
            opt.step()
            lowp.copy_(param.detach())
        return go

    return [("fused_adamw_ (Triton)", ideal, run(backend)),
            ("  torch reference, unfused", ideal, run("torch")),
            ("  torch AdamW fused=True + upcast/cast", ideal, torch_optimizer(fused=True)),
            ("  torch AdamW foreach=True + upcast/cast", ideal, torch_optimizer(foreach=True))]


def sumsq_rows(numel: int, device: torch.device, backend: str) -> list[tuple[str, int, Callable]]:
    grad = torch.randn(numel, device=device).to(torch.bfloat16)
    out = torch.empty(2, device=device)

    def engine_today() -> None:   # hf_zero.optim.grad_norm: the norm only, no count
        torch.linalg.vector_norm(grad, dtype=torch.float32).square()

    return [("sumsq_and_nonfinite (Triton)", 2 * numel,
             lambda: hk.sumsq_and_nonfinite([grad], out=out, backend=backend)),
            ("  torch reference, unfused", 2 * numel, lambda: hk.sumsq_and_nonfinite([grad], out=out, backend="torch")),
            ("  torch vector_norm only (no count)", 2 * numel, engine_today)]


def quant_rows(numel: int, device: torch.device, backend: str, block_size: int) -> list[tuple[str, int, Callable]]:
    x = torch.randn(numel, device=device).to(torch.bfloat16)
    q = torch.empty(numel, dtype=torch.int8, device=device)
    scales = torch.empty(hk.num_quant_blocks(numel, block_size), device=device)
    out = torch.empty_like(x)
    ideal = 2 * numel + numel + 4 * scales.numel()   # bf16 in, int8 + fp32 scales out (and back)

    def quantize(chosen: str) -> Callable[[], object]:
        return lambda: hk.quantize_int8_blockwise(x, block_size, out=(q, scales), backend=chosen)

    def dequantize(chosen: str) -> Callable[[], object]:
        return lambda: hk.dequantize_int8_blockwise(q, scales, block_size=block_size, out=out, backend=chosen)

    return [(f"quantize_int8_blockwise bf16, block {block_size} (Triton)", ideal, quantize(backend)),
            ("  torch reference, unfused", ideal, quantize("torch")),
            (f"dequantize_int8_blockwise -> bf16, block {block_size} (Triton)", ideal, dequantize(backend)),
            ("  torch reference, unfused", ideal, dequantize("torch"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=2**26)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=hk.DEFAULT_QUANT_BLOCK_SIZE)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, Triton interpreter, tiny sizes: checks this script, measures nothing")
    args = parser.parse_args()

    if args.smoke:
        # before the kernel modules (and triton) are first imported, by the first call
        os.environ["TRITON_INTERPRET"] = "1"
        device, backend, numel, iters, copy_bytes = torch.device("cpu"), "triton", 4096, 2, 2**20
        print("SMOKE RUN on CPU through the Triton interpreter: timings below mean nothing.")
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device found. These benchmarks measure GPU memory "
              "bandwidth, so nothing was measured (the kernels' CPU path is the torch reference; "
              "tests/kernels runs the Triton kernels in the interpreter). Exiting.")
        return 0
    else:
        device, backend, numel, iters, copy_bytes = torch.device("cuda"), "auto", args.numel, args.iters, 2**30
        if not hk.triton_available():
            print("benchmarks/kernels.py: triton is not installed (pip install 'hf_zero[kernels]'). Exiting.")
            return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    copy_gbs = copy_bandwidth_gbs(device, iters, copy_bytes)
    import triton  # only now: the kernels are loaded lazily, the version is for the record

    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"numel {numel:,}; median of {iters}; copy bandwidth {copy_gbs:,.0f} GB/s\n")
    print("| operation | ideal bytes | ms | GB/s | % copy |")
    print("|---|---:|---:|---:|---:|")
    rows = (adamw_rows(numel, device, backend) + sumsq_rows(numel, device, backend)
            + quant_rows(numel, device, backend, args.block_size))
    for label, ideal, fn in rows:
        ms = time_ms(fn, iters, device)
        gbs = ideal / ms / 1e6
        print(f"| {label} | {ideal / 2**20:,.0f} MiB | {ms:.3f} | {gbs:,.0f} | {100 * gbs / copy_gbs:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
