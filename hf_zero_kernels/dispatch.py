"""The public kernel functions: validate arguments, then run the Triton kernel for CUDA
tensors and the torch reference otherwise.

triton is imported lazily, only when a kernel is about to run through it, so this package
imports (and every function works, through the references) without triton installed.

``backend`` on every function: "auto" (Triton when every tensor is on CUDA, triton
imports and ``TRITON_VERIFIED_ON_DEVICE``; else the reference), "torch" (always the
reference) or "triton" (always the kernel; on CPU tensors that only works under
TRITON_INTERPRET=1, which is how the tests run the kernels without a GPU).

The compiled kernels have run only in Triton's interpreter so far: until ``make gpu-check``
(docs/gpu.md) has passed on a real device and ``TRITON_VERIFIED_ON_DEVICE`` is set to True
here, "auto" keeps CUDA tensors on the torch references (correct, slower), and the engine's
``fused_kernels: "auto"`` keeps torch's fused AdamW. Triton on a GPU is opt-in meanwhile.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import torch

from hf_zero_kernels.fused_adamw_ref import fused_adamw_ref
from hf_zero_kernels.quant_int8_ref import (
    dequantize_int8_blockwise_ref,
    quantize_int8_blockwise_ref,
)
from hf_zero_kernels.sumsq_nonfinite_ref import sumsq_and_nonfinite_ref

Backend = Literal["auto", "triton", "torch"]

DEFAULT_QUANT_BLOCK_SIZE = 2048   # scales cost 4 / 2048 = 0.2% extra traffic
MIN_QUANT_BLOCK_SIZE, MAX_QUANT_BLOCK_SIZE = 16, 16384
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOWP_DTYPES = (torch.bfloat16, torch.float16)
TRITON_VERIFIED_ON_DEVICE = False   # flip once `make gpu-check` passes on a GPU (module docstring)


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (checked once, and only when a CUDA tensor asks for it)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def use_triton(tensors: Sequence[torch.Tensor], backend: Backend) -> bool:
    """The dispatch rule (module docstring)."""
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("hf_zero_kernels: backend='triton' but triton is not installed "
                               "(pip install 'hf_zero[kernels]')")
        return True
    if backend == "auto":
        return (TRITON_VERIFIED_ON_DEVICE and bool(tensors) and all(t.is_cuda for t in tensors)
                and triton_available())
    raise ValueError(f"hf_zero_kernels: backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def _kernel_module(name: str) -> ModuleType:
    return importlib.import_module(f"hf_zero_kernels.{name}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"hf_zero_kernels: {message}")


def _check_flat(name: str, t: torch.Tensor, numel: int, dtypes: tuple[torch.dtype, ...],
                device: torch.device) -> None:
    _check(t.is_contiguous(), f"{name} must be contiguous")
    _check(t.numel() == numel, f"{name} has {t.numel()} elements, expected {numel}")
    _check(t.dtype in dtypes, f"{name} has dtype {t.dtype}, expected one of {list(dtypes)}")
    _check(t.device == device, f"{name} is on {t.device}, expected {device}")


def _check_scalar_tensor(name: str, t: torch.Tensor, device: torch.device) -> None:
    _check(t.numel() == 1, f"{name} must be a 1-element tensor (got {t.numel()} elements)")
    _check(t.device == device, f"{name} is on {t.device}, expected {device} (no host sync)")


def fused_adamw_(
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: torch.Tensor,
    overflow: torch.Tensor | None = None,
    out_lowp: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> None:
    """One torch.optim.AdamW step over a flat fp32 master shard, in place, in one pass.

    master, exp_avg, exp_avg_sq: contiguous fp32, same numel (updated in place).
    grad: same numel, fp32 / bf16 / fp16 (read only); the update uses
    g = float(grad) * grad_scale. grad_scale: 1-element fp32 device tensor
    (1 / (loss_scale x grad_divisor) x clip coefficient). overflow: optional 1-element
    device tensor of any dtype; nonzero or NaN skips the whole step, leaving every buffer
    untouched, decided on the device without a host sync (Triton path). out_lowp: optional
    bf16 / fp16 buffer, same numel, receiving the updated master rounded to nearest even.
    step: the 1-based step count used for bias correction (a Python int; the caller keeps
    it, and must not advance it for a skipped step).
    """
    device = master.device
    numel = master.numel()
    _check_flat("master", master, numel, (torch.float32,), device)
    _check_flat("grad", grad, numel, GRAD_DTYPES, device)
    _check_flat("exp_avg", exp_avg, numel, (torch.float32,), device)
    _check_flat("exp_avg_sq", exp_avg_sq, numel, (torch.float32,), device)
    _check_scalar_tensor("grad_scale", grad_scale, device)
    _check(grad_scale.dtype == torch.float32, f"grad_scale must be fp32, got {grad_scale.dtype}")
    if overflow is not None:
        _check_scalar_tensor("overflow", overflow, device)
    if out_lowp is not None:
        _check_flat("out_lowp", out_lowp, numel, LOWP_DTYPES, device)
    # torch.optim.AdamW's own checks
    _check(isinstance(step, int) and step >= 1, f"step must be an int >= 1, got {step!r}")
    _check(lr >= 0.0, f"invalid learning rate {lr}")
    _check(eps >= 0.0, f"invalid eps {eps}")
    _check(0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0, f"invalid betas ({beta1}, {beta2})")
    _check(weight_decay >= 0.0, f"invalid weight_decay {weight_decay}")

    tensors = [master, grad, exp_avg, exp_avg_sq, grad_scale]
    run = (_kernel_module("fused_adamw").fused_adamw_triton if use_triton(tensors, backend)
           else fused_adamw_ref)
    run(master, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, grad_scale=grad_scale, overflow=overflow,
        out_lowp=out_lowp)


def sumsq_and_nonfinite(
    tensors: Sequence[torch.Tensor],
    *,
    out: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sumsq, num_nonfinite) over every element of ``tensors`` (contiguous fp32 / bf16 /
    fp16, one device), in one pass over memory: sumsq = sum of float(x)^2 in fp32,
    num_nonfinite = how many elements are inf or NaN (fp32 count, exact to 2^24; 0 means
    finite). Both are 1-element views of one 2-element fp32 buffer (``out`` if given,
    else new; written whole), so one all-reduce (SUM) of it gives the global values:
    norm = sqrt(sumsq), overflow = num_nonfinite > 0.
    """
    tensors = list(tensors)
    device = tensors[0].device if tensors else (out.device if out is not None else torch.device("cpu"))
    for i, t in enumerate(tensors):
        _check_flat(f"tensors[{i}]", t, t.numel(), GRAD_DTYPES, device)
    if out is None:
        out = torch.empty(2, dtype=torch.float32, device=device)
    _check_flat("out", out, 2, (torch.float32,), device)
    if use_triton([*tensors, out], backend):
        return _kernel_module("sumsq_nonfinite").sumsq_and_nonfinite_triton(tensors, out)
    return sumsq_and_nonfinite_ref(tensors, out)


def num_quant_blocks(numel: int, block_size: int = DEFAULT_QUANT_BLOCK_SIZE) -> int:
    """How many scales ``quantize_int8_blockwise`` writes for ``numel`` elements."""
    return -(-numel // block_size)


def _check_block_size(block_size: int) -> None:
    _check(isinstance(block_size, int) and block_size & (block_size - 1) == 0
           and MIN_QUANT_BLOCK_SIZE <= block_size <= MAX_QUANT_BLOCK_SIZE,
           f"block_size must be a power of two in [{MIN_QUANT_BLOCK_SIZE}, "
           f"{MAX_QUANT_BLOCK_SIZE}], got {block_size!r}")


def quantize_int8_blockwise(
    x: torch.Tensor,
    block_size: int = DEFAULT_QUANT_BLOCK_SIZE,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric blockwise int8 quantization of a contiguous fp32 / bf16 / fp16 buffer.

    Returns (q, scales): q int8 with x.numel() elements (flat), scales fp32 with
    num_quant_blocks(numel, block_size) elements, one per block of ``block_size``
    consecutive elements (the last may be short). ``out`` = (q, scales) to write into
    preallocated (e.g. communication) buffers. Error bound: docs/kernels.md,
    |x - dequantize(q, scales)| <= scale_b * (1/2 + 2^-16) ~ max|x_b| / 254.
    """
    _check_block_size(block_size)
    numel = x.numel()
    _check_flat("x", x, numel, GRAD_DTYPES, x.device)
    if out is None:
        q = torch.empty(numel, dtype=torch.int8, device=x.device)
        scales = torch.empty(num_quant_blocks(numel, block_size), dtype=torch.float32, device=x.device)
    else:
        q, scales = out
        _check_flat("out[0] (q)", q, numel, (torch.int8,), x.device)
        _check_flat("out[1] (scales)", scales, num_quant_blocks(numel, block_size), (torch.float32,), x.device)
    if use_triton([x], backend):
        _kernel_module("quant_int8").quantize_int8_blockwise_triton(x, block_size, q, scales)
    else:
        quantize_int8_blockwise_ref(x.view(-1), block_size, q.view(-1), scales.view(-1))
    return q, scales


def dequantize_int8_blockwise(
    q: torch.Tensor,
    scales: torch.Tensor,
    *,
    block_size: int = DEFAULT_QUANT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Inverse of ``quantize_int8_blockwise`` (same ``block_size``): a flat tensor of
    q.numel() elements of ``dtype`` (fp32 / bf16 / fp16; ``out``'s dtype when given),
    q_i * scale_(i // block_size) rounded once to nearest even. A block quantized from
    inf / NaN comes back as all NaN."""
    _check_block_size(block_size)
    numel = q.numel()
    _check_flat("q", q, numel, (torch.int8,), q.device)
    _check_flat("scales", scales, num_quant_blocks(numel, block_size), (torch.float32,), q.device)
    if out is None:
        _check(dtype in GRAD_DTYPES, f"dtype must be one of {list(GRAD_DTYPES)}, got {dtype}")
        out = torch.empty(numel, dtype=dtype, device=q.device)
    _check_flat("out", out, numel, GRAD_DTYPES, q.device)
    if use_triton([q, scales, out], backend):
        _kernel_module("quant_int8").dequantize_int8_blockwise_triton(q, scales, block_size, out)
    else:
        dequantize_int8_blockwise_ref(q.view(-1), scales.view(-1), block_size, out.view(-1))
    return out
