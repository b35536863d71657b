"""Do all ranks hold the same model and config? Checked once at ``initialize``.

Ranks built from different configs (a different ``n_layer``, another ``reduce_bucket_size``)
would otherwise issue collectives of different sizes and hang or corrupt each other. Each rank
hashes its resolved config and its parameters' names, shapes, dtypes and trainability; the
digests are all-gathered (a few bytes), and only on a mismatch the full descriptions, to name
the first difference and the ranks that disagree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from hf_zero.comm import Collectives, RankFailure
from hf_zero.config import HfZeroConfig, config_to_dict

_PER_RANK_KEYS = ("nvme_path",)   # may legitimately differ between ranks (node-local disks)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key not in _PER_RANK_KEYS:
                out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def describe(model: nn.Module, config: HfZeroConfig) -> dict[str, Any]:
    params = [(name, list(getattr(p, "ds_shape", None) or p.shape), str(p.dtype), p.requires_grad)
              for name, p in model.named_parameters()]
    return {"config": _flatten(json.loads(json.dumps(config_to_dict(config), default=str))), "params": params}


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    for key in sorted(set(a["config"]) | set(b["config"])):
        if a["config"].get(key) != b["config"].get(key):
            return f"config '{key}': {a['config'].get(key)!r} vs {b['config'].get(key)!r}"
    if len(a["params"]) != len(b["params"]):
        names_a, names_b = [p[0] for p in a["params"]], [p[0] for p in b["params"]]
        only = sorted(set(names_a) ^ set(names_b))[:3]
        return f"{len(a['params'])} vs {len(b['params'])} parameters (e.g. {only})"
    for pa, pb in zip(a["params"], b["params"]):
        if pa != pb:
            return f"parameter {pa[0]} {pa[1]} {pa[2]} trainable={pa[3]} vs {pb[0]} {pb[1]} {pb[2]} trainable={pb[3]}"
    return "a difference the digest saw"


def check_same_everywhere(comm: Collectives, model: nn.Module, config: HfZeroConfig) -> None:
    """Raise on every rank, naming the first difference and the ranks, unless all ranks agree."""
    if not comm.active:
        return
    mine = describe(model, config)
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
    digests = comm.all_gather_objects(digest)
    if len(set(digests)) == 1:
        return
    everyone = comm.all_gather_objects(mine)
    other = next(r for r, d in enumerate(digests) if d != digests[0])
    raise RankFailure(f"hf_zero.initialize: ranks built different models or configs: rank 0 and rank {other} "
                      f"differ in {_first_difference(everyone[0], everyone[other])} (ranks with rank 0's: "
                      f"{[r for r, d in enumerate(digests) if d == digests[0]]}, others: "
                      f"{[r for r, d in enumerate(digests) if d != digests[0]]})")
