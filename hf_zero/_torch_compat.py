"""torch names that differ across the supported range (pyproject.toml: ``torch>=2.6``).

Each shim is the one place hf_zero reaches the name; callers never test torch's version
themselves. Every shim resolves once, at import, to torch's own function, so the newest torch
runs exactly the call it ran before the shim existed. `make test-compat` runs the parity and
integration subset on the oldest versions (compat/oldest.txt); tests/test_upstream_contract.py
checks that each name resolved here still takes the parameters hf_zero passes. When the lower
bound moves past the version a shim names, delete the shim and call torch directly.
"""

from __future__ import annotations

import functools
import inspect

import torch.distributed as dist
from torch.optim.adam import adam as _adam

# torch >= 2.13 calls the single-tensor collectives all_gather_single / reduce_scatter_single
# and deprecates (with a warning) the old names; torch 2.6 - 2.12 only have
# all_gather_into_tensor / reduce_scatter_tensor, which take the same arguments in the same order.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _adam_with_decoupled_flag():
    """torch >= 2.7: ``torch.optim.adam.adam`` takes ``decoupled_weight_decay``. torch 2.6:
    the flag does not exist; AdamW's update is the separate functional ``torch.optim.adamw.adamw``,
    with otherwise the same parameters, which is what those versions' ``torch.optim.AdamW.step``
    calls (so offloaded AdamW stays bit-identical to it)."""
    if "decoupled_weight_decay" in inspect.signature(_adam).parameters:
        return _adam
    from torch.optim.adamw import adamw as _adamw

    @functools.wraps(_adam)
    def adam(*args, decoupled_weight_decay: bool = False, **kwargs):
        return (_adamw if decoupled_weight_decay else _adam)(*args, **kwargs)

    return adam


# ``adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, decoupled_weight_decay,
# ...)``: torch's functional Adam / AdamW on every supported version.
adam = _adam_with_decoupled_flag()
