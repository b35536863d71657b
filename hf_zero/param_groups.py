"""Which trainable parameters form which optimizer group, in backward-ready layout order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class ParamGroupSpec:
    params: list[nn.Parameter]            # trainable, layout order
    names: list[str]
    options: dict[str, Any] = field(default_factory=dict)   # the optimizer group's hyperparameters


def collect_param_groups(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> list[ParamGroupSpec]:
    """One spec per optimizer group (or one for the whole model when no optimizer is given).

    Frozen parameters are left out. Within a group, parameters are laid out in reverse
    registration order, which approximates the order in which backward produces gradients.
    Raises if a trainable parameter is missing from the optimizer or listed twice.
    """
    named = list(model.named_parameters())
    name_of = {id(p): n for n, p in named}
    order = {id(p): i for i, (_, p) in enumerate(named)}
    trainable = [p for _, p in named if p.requires_grad]

    if optimizer is None:
        raw_groups: list[tuple[dict, list[nn.Parameter]]] = [({}, trainable)]
    else:
        raw_groups = []
        for group in optimizer.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            raw_groups.append((options, list(group["params"])))

    seen: dict[int, int] = {}
    specs = []
    for group_index, (options, params) in enumerate(raw_groups):
        kept = []
        for p in params:
            if id(p) not in name_of:
                raise ValueError(f"optimizer param group {group_index} holds a tensor of shape "
                                 f"{tuple(p.shape)} that is not a parameter of the model")
            if id(p) in seen:
                raise ValueError(f"parameter '{name_of[id(p)]}' appears in optimizer groups "
                                 f"{seen[id(p)]} and {group_index}")
            seen[id(p)] = group_index
            if p.requires_grad:
                kept.append(p)
        kept.sort(key=lambda p: -order[id(p)])
        specs.append(ParamGroupSpec(kept, [name_of[id(p)] for p in kept], options))

    missing = [name_of[id(p)] for p in trainable if id(p) not in seen]
    if missing:
        raise ValueError(f"trainable parameters not in any optimizer group: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} (freeze them or add them to the optimizer)")
    return specs
