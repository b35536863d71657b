"""Point an optimizer at master chunks: build one from the config, or rebind the user's."""

from __future__ import annotations

from typing import Optional

import torch

from hf_zero.config.schema import AUTO, OptimizerConfig


def _fused_supported(device: torch.device) -> bool:
    # torch ships fused Adam/AdamW kernels for CPU and CUDA; other backends use foreach.
    return device.type in ("cpu", "cuda")


def build_optimizer(config: Optional[OptimizerConfig], master_groups: list[list[torch.Tensor]],
                    group_options: list[dict]) -> torch.optim.Optimizer:
    """An Adam/AdamW over ``master_groups`` with the config's hyperparameters (DeepSpeed's
    ``Adam`` means AdamW unless ``adam_w_mode`` is false). Per-group options win."""
    from hf_zero.config.parse import ConfigError

    config = config or OptimizerConfig()
    p = config.params
    autos = [n for n in ("lr", "betas", "eps", "weight_decay") if getattr(p, n) == AUTO]
    if autos:
        raise ConfigError([(f"optimizer.params.{n}", "is still 'auto'; an integration must resolve it")
                           for n in autos])
    decoupled = config.type == "AdamW" or p.adam_w_mode
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    device = next((t.device for g in master_groups for t in g), torch.device("cpu"))
    groups = [{"params": params, **options} for params, options in zip(master_groups, group_options)]
    return cls(groups, lr=p.lr, betas=p.betas, eps=p.eps, weight_decay=p.weight_decay, amsgrad=p.amsgrad,
               fused=_fused_supported(device) or None)


def check_optimizer_is_fresh(optimizer: torch.optim.Optimizer) -> None:
    """A user's optimizer must not have stepped: its state is per full parameter."""
    if any(optimizer.state.values()):
        raise ValueError("pass the optimizer to hf_zero.initialize before its first step "
                         "(its existing state cannot be partitioned)")


def rebind_optimizer(optimizer: torch.optim.Optimizer, master_groups: list[list[torch.Tensor]]) -> None:
    """Make a user's optimizer step the master chunks instead of the model's parameters
    (its class, hyperparameters and group structure are kept; it must be elementwise)."""
    if len(optimizer.param_groups) != len(master_groups):
        raise ValueError("internal: optimizer groups and flat groups disagree")
    check_optimizer_is_fresh(optimizer)
    optimizer.state.clear()
    for group, masters in zip(optimizer.param_groups, master_groups):
        group["params"] = list(masters)
