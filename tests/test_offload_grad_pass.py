"""The CPU update's gradient pass ([Note: folding the coefficient] in offload/grad_pass.py):
skipping the multiply (c == 1) or folding it into the fused kernel (c a power of two) must
give the same bits as torch.optim.AdamW stepping on gradients multiplied by c beforehand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_zero.offload.cpu import CpuOffload
from hf_zero.offload.grad_pass import exact_reciprocal

CHUNKS = [[4231, 1000], [777]]    # per parameter group: chunk sizes (awkward, split by sub-groups)
SUB_GROUP = 1500
GROUP_OPTIONS = [{}, {"lr": 3e-3, "weight_decay": 0.0}]
HYPER = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.01}


@pytest.mark.parametrize("c,expected", [(1.0, 1.0), (0.5, 2.0), (2.0 ** -17, 2.0 ** 17), (4.0, 0.25),
                                        (2.0 ** -126, 2.0 ** 126), (2.0 ** -127, None), (2.0 ** 127, None),
                                        (0.37, None), (3.0, None), (0.0, None), (math.inf, None),
                                        (math.nan, None), (-0.5, None)])
def test_exact_reciprocal_only_for_powers_of_two_with_normal_reciprocals(c, expected):
    assert exact_reciprocal(c) == expected


def _awkward_grads(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=g) * 10.0 ** torch.randint(-40, 20, (numel,), generator=g).float()
    values[:4] = torch.tensor([1e-45, -3e-39, 1.1754942e-38, 0.0])   # subnormals, smallest normal, zero
    return values


@pytest.mark.parametrize("c", (0.5, 2.0 ** -17, 0.37, 1 / 3))
def test_torch_divides_exactly_by_the_reciprocal_of_powers_of_two_only(c):
    """The premise, on torch's own kernels: grad_scale = 1/c gives x * c's bits iff c = 2**k."""
    grads = _awkward_grads(4231, 0)
    divided = grads.clone()
    inv = torch.tensor(1.0 / c, dtype=torch.float32)
    torch._fused_adamw_([torch.zeros(4231)], [divided], [torch.zeros(4231)], [torch.zeros(4231)], [],
                        [torch.zeros(())], lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8,
                        amsgrad=False, maximize=False, grad_scale=inv, found_inf=None)
    multiplied = grads * torch.tensor([c], dtype=torch.float32)
    assert torch.equal(divided, multiplied) == (exact_reciprocal(c) is not None)


def _run(dtype: torch.dtype, c: float, fused, opt_cls=torch.optim.AdamW, amsgrad: bool = False,
         steps: int = 3, fold: bool = True, maximize: bool = False):
    """(offloaded fp32 masters, states, model-dtype chunks; torch reference params, states)."""
    torch.manual_seed(0)
    owned = [[torch.randn(n).to(dtype) for n in sizes] for sizes in CHUNKS]
    offload = CpuOffload(owned, SUB_GROUP, pin_memory=False)
    offload.fold_coefficient = fold
    extra = {"amsgrad": amsgrad, "fused": fused, "maximize": maximize}
    inner = opt_cls([{"params": m, **o} for m, o in zip(offload.masters.masters, GROUP_OPTIONS)], **HYPER, **extra)
    offload.attach(inner)
    # Reference: torch's optimizer on independent fp32 copies, gradients multiplied by c here.
    # fused=None means torch's fused kernel when offloaded ([Note: which CPU AdamW]).
    ref = [[torch.nn.Parameter(p.detach().to(torch.float32).clone()) for p in g] for g in owned]
    ref_extra = {**extra, "fused": True if fused is None else fused}
    ref_opt = opt_cls([{"params": r, **o} for r, o in zip(ref, GROUP_OPTIONS)], **HYPER, **ref_extra)
    coefficient = torch.tensor([c], dtype=torch.float32)
    for step in range(steps):
        grads = [[_awkward_grads(n, 100 * step + i).mul_(1e-3).to(dtype) for i, n in enumerate(sizes)]
                 for sizes in CHUNKS]
        for rs, gs in zip(ref, grads):
            for r, g in zip(rs, gs):
                r.grad = g.to(torch.float32) * coefficient
        ref_opt.step()
        offload.step([[g.clone() for g in gs] for gs in grads], coefficient)
    return offload, inner, owned, ref, ref_opt


def _assert_bit_identical(offload, inner, owned, ref, ref_opt):
    for masters, chunks, refs in zip(offload.masters.masters, owned, ref):
        for master, chunk, r in zip(masters, chunks, refs):
            assert torch.equal(master, r.detach())
            assert torch.equal(chunk, r.detach().to(chunk.dtype))
            for key, value in ref_opt.state[r].items():
                assert torch.equal(inner.state[master][key], value), key


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("c", (1.0, 0.5, 2.0 ** -17, 0.37), ids=("c1", "c0.5", "c2^-17", "c0.37"))
@pytest.mark.parametrize("fused", (None, True, False), ids=("default", "fused", "foreach"))
def test_offloaded_adamw_is_bit_identical_to_torch_on_prescaled_grads(dtype, c, fused):
    _assert_bit_identical(*_run(dtype, c, fused))


@pytest.mark.parametrize("c", (1.0, 0.25, 0.37))
def test_offloaded_adam_amsgrad_is_bit_identical_to_torch_on_prescaled_grads(c):
    _assert_bit_identical(*_run(torch.float32, c, None, opt_cls=torch.optim.Adam, amsgrad=True))


@pytest.mark.parametrize("c", (1.0, 0.25, 0.37))
def test_offloaded_adamw_maximize_is_bit_identical_to_torch_on_prescaled_grads(c):
    _assert_bit_identical(*_run(torch.float32, c, None, maximize=True))


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}
        self.grad_scales: list = []    # per fused-kernel call: its grad_scale value or None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        if name == "_fused_adamw_":
            scale = kwargs.get("grad_scale")
            self.grad_scales.append(None if scale is None else scale.item())
        return func(*args, **kwargs)


@pytest.mark.parametrize("c,fold,multiplies,divides", [(1.0, True, 0, 0), (0.5, True, 0, 1), (0.37, True, 1, 0),
                                                       (1.0, False, 1, 0), (0.5, False, 1, 0)])
def test_the_separate_multiply_pass_runs_only_where_folding_is_inexact(c, fold, multiplies, divides):
    """fp32 host gradients: c == 1 needs no pass, c = 2**k goes into the kernel, others multiply;
    ``fold_coefficient = False`` is the always-multiply path."""
    owned = [[torch.randn(n) for n in sizes] for sizes in CHUNKS]
    offload = CpuOffload(owned, SUB_GROUP, pin_memory=False)
    offload.fold_coefficient = fold
    offload.attach(torch.optim.AdamW([{"params": m} for m in offload.masters.masters], **HYPER))
    grads = [[torch.randn(n) for n in sizes] for sizes in CHUNKS]
    num_slices = sum(len(sg.slices) for sg in offload.plan)
    num_calls = sum(len({s.group for s in sg.slices}) for sg in offload.plan)   # kernel calls: per group per sub-group
    with _CountOps() as counted:
        offload.step(grads, torch.tensor([c]))
    assert counted.ops.get("mul_", 0) == multiplies * num_slices
    assert counted.ops.get("_fused_adamw_", 0) == num_calls
    assert counted.ops.get("copy_", 0) + counted.ops.get("_to_copy", 0) == 0   # fp32 host grads are not copied
    assert counted.grad_scales == [1 / c if divides else None] * num_calls
