"""Shared fixtures for the hf_zero_kernels tests, which run the Triton kernels on CPU
tensors through Triton's interpreter."""

import os

# Before any kernel module is imported: @triton.jit reads it when a kernel is defined.
# Forced (not setdefault) so an outer TRITON_INTERPRET=0 cannot make these tests try to
# compile for a GPU with CPU tensors. tests/conftest.py also setdefaults it.
os.environ["TRITON_INTERPRET"] = "1"

import collections
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """Fresh random data on every run; the seed is printed, so a failure shows it, and
    HF_ZERO_KERNEL_SEED=<seed> replays it."""
    seed = int(os.environ.get("HF_ZERO_KERNEL_SEED", random.randrange(2**31)))
    print(f"HF_ZERO_KERNEL_SEED={seed}")
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture
def launches(monkeypatch) -> collections.Counter:
    """Counts interpreted Triton launches by kernel name, proving a test really ran the
    kernel (through the interpreter) rather than a torch fallback."""
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    counts: collections.Counter = collections.Counter()
    original = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return original(self, *args, **kwargs)

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET must be set before triton is used"
    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return counts
