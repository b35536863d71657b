"""Compile every hf_zero_kernels Triton kernel ahead of time for NVIDIA GPUs, without one.

Run as a script in a process where TRITON_INTERPRET is unset (the tests' interpreter mode
replaces @triton.jit functions by interpreted ones, which cannot be compiled). It checks
what the interpreter cannot: that the kernels are valid compiled Triton (constexpr
branches, types, casts) and that the IEEE ops asked for reach the PTX. Prints one line per
compiled variant; exits non-zero on the first failure. The test runs a reduced grid
(sm_90, each dtype once); ``--all`` compiles the full grid for sm_90 and sm_80 (~40 s).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root

import triton  # noqa: E402 (after the environment set-up above)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hf_zero_kernels import fused_adamw, quant_int8, sumsq_nonfinite  # noqa: E402

ALL_TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]


def compile_variant(fn, signature: dict, constexprs: dict, target: GPUTarget, num_warps: int) -> str:
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs)
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    return triton.compile(src, target=target, options=options).asm["ptx"]


def variants(full: bool):
    scalars = {k: "fp32" for k in ("wd_factor", "one_minus_beta1", "beta2", "one_minus_beta2",
                                   "bias_correction2_sqrt", "eps", "neg_step_size")}
    adamw_grid = ([(g, lo, f) for g in ("fp32", "bf16", "fp16") for lo in ("bf16", "fp16") for f in ("u8", "fp32")]
                  if full else [("fp32", "bf16", "u8"), ("bf16", "fp16", "fp32"), ("fp16", "bf16", "u8")])
    for grad, lowp, flag in adamw_grid:
        sig = {"master_ptr": "*fp32", "grad_ptr": f"*{grad}", "exp_avg_ptr": "*fp32",
               "exp_avg_sq_ptr": "*fp32", "out_lowp_ptr": f"*{lowp}", "grad_scale_ptr": "*fp32",
               "overflow_ptr": f"*{flag}", "numel": "i64", **scalars}
        for has_extras in (True, False) if grad == "bf16" else (True,):
            yield (f"fused_adamw grad={grad} lowp={lowp} flag={flag} extras={has_extras}",
                   fused_adamw._fused_adamw_kernel, sig,
                   {"HAS_OVERFLOW": has_extras, "HAS_LOWP": has_extras, "BLOCK": fused_adamw.BLOCK},
                   fused_adamw.NUM_WARPS, ("div.rn.f32", "sqrt.rn.f32", "fma.rn.f32"))
    for x in ("fp32", "bf16", "fp16"):
        yield (f"sumsq partials x={x}", sumsq_nonfinite._partials_kernel,
               {"x_ptr": f"*{x}", "sumsq_ptr": "*fp32", "count_ptr": "*fp32", "numel": "i64"},
               {"BLOCK": sumsq_nonfinite.BLOCK}, sumsq_nonfinite.NUM_WARPS, ())
        for block_size in ((16, 2048, 16384) if full else ({"fp32": 16, "bf16": 2048, "fp16": 16384}[x],)):
            rows = quant_int8._rows(block_size)
            yield (f"quantize x={x} block={block_size}", quant_int8._quantize_kernel,
                   {"x_ptr": f"*{x}", "q_ptr": "*i8", "scale_ptr": "*fp32", "numel": "i64", "num_blocks": "i64"},
                   {"BLOCK_SIZE": block_size, "ROWS": rows}, quant_int8.NUM_WARPS, ("div.rn.f32",))
            yield (f"dequantize out={x} block={block_size}", quant_int8._dequantize_kernel,
                   {"q_ptr": "*i8", "scale_ptr": "*fp32", "out_ptr": f"*{x}", "numel": "i64", "num_blocks": "i64"},
                   {"BLOCK_SIZE": block_size, "ROWS": rows}, quant_int8.NUM_WARPS, ())
    yield ("sumsq finish", sumsq_nonfinite._finish_kernel,
           {"sumsq_ptr": "*fp32", "count_ptr": "*fp32", "out_ptr": "*fp32", "num_partials": "i32"},
           {"BLOCK": sumsq_nonfinite.FINISH_BLOCK}, 4, ())


def main() -> int:
    full = "--all" in sys.argv
    for target in ALL_TARGETS if full else ALL_TARGETS[:1]:
        for name, fn, sig, constexprs, num_warps, must_contain in variants(full):
            ptx = compile_variant(fn, sig, constexprs, target, num_warps)
            missing = [op for op in must_contain if op not in ptx]
            if missing:
                print(f"FAIL sm_{target.arch} {name}: PTX lacks {missing}")
                return 1
            print(f"ok sm_{target.arch} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
