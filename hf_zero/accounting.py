"""Bytes held per category, each storage counted once (first category wins)."""

from __future__ import annotations

import torch

# persistent_params: stage 3's kept-gathered small parameters, listed first so that
# their full copies are not counted as "params" (reported apart from the 16 Psi / N formula).
CATEGORIES = ("persistent_params", "params", "grads", "master_params", "optimizer_states", "comm_buffers",
              "offload_buffers")


def bytes_by_category(tensors: dict[str, list[torch.Tensor]]) -> dict[str, int]:
    """Sum the bytes of the distinct storages under each category, in ``CATEGORIES`` order.

    A view (e.g. an fp32 master chunk that *is* part of the flat parameter buffer) adds
    nothing once its storage was counted, so the totals are what the process really holds.
    """
    seen: set[tuple[str, int]] = set()
    result = {}
    for category in CATEGORIES:
        total = 0
        for tensor in tensors.get(category, []):
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        result[category] = total
    result["total"] = sum(result[c] for c in CATEGORIES)
    return result
