"""DeepSpeed's WarmupLR, WarmupDecayLR and WarmupCosineLR as torch LR schedulers.

Step ``t`` is the number of optimizer steps taken (0 before the first). Warmup uses
``max(2, warmup_num_steps)`` steps with ``log``: gamma = ln(t + 1) / ln(W) or
``linear``: gamma = t / W.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from hf_zero.config.schema import AUTO, SchedulerConfig


def _warmup_gamma(step: int, warmup_steps: int, warmup_type: str) -> float:
    if warmup_type == "log":
        return math.log(step + 1) / math.log(warmup_steps)
    return step / warmup_steps


class WarmupLR(LRScheduler):
    """lr = min_lr + (max_lr - min_lr) * gamma(t) during warmup, then max_lr."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_min_lr: float = 0.0,
                 warmup_max_lr: float | None = None, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_epoch: int = -1):
        self.min_lr = warmup_min_lr
        self.max_lr = warmup_max_lr if warmup_max_lr is not None else optimizer.param_groups[0]["lr"]
        self.warmup_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_epoch)

    def _gamma(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup_gamma(step, self.warmup_steps, self.warmup_type)
        return 1.0

    def get_lr(self) -> list[float]:
        lr = self.min_lr + (self.max_lr - self.min_lr) * self._gamma(self.last_epoch)
        return [lr for _ in self.optimizer.param_groups]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at ``total_num_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, **kwargs):
        self.total_steps = total_num_steps
        super().__init__(optimizer, **kwargs)

    def _gamma(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup_gamma(step, self.warmup_steps, self.warmup_type)
        return max(0.0, (self.total_steps - step) / max(1.0, self.total_steps - self.warmup_steps))


class WarmupCosineLR(LRScheduler):
    """Ratio of each group's initial lr: warmup from ``warmup_min_ratio`` to 1, then a cosine
    down to ``cos_min_ratio`` at ``total_num_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int,
                 warmup_min_ratio: float = 0.0, warmup_num_steps: int = 1000,
                 cos_min_ratio: float = 1e-4, warmup_type: str = "log", last_epoch: int = -1):
        self.total_steps = total_num_steps
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_steps = max(2, warmup_num_steps)
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_epoch)

    def _ratio(self, step: int) -> float:
        if step < self.warmup_steps:
            gamma = _warmup_gamma(step, self.warmup_steps, self.warmup_type)
            return self.warmup_min_ratio + gamma * (1.0 - self.warmup_min_ratio)
        progress = (step - self.warmup_steps + 1) / max(1, self.total_steps - self.warmup_steps)
        cosine = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:
        return [base * self._ratio(self.last_epoch) for base in self.base_lrs]


def build_scheduler(config: SchedulerConfig, optimizer: torch.optim.Optimizer) -> LRScheduler:
    from hf_zero.config.parse import ConfigError

    params = config.params
    autos = [name for name in ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps")
             if getattr(params, name) == AUTO]
    if autos:
        raise ConfigError([(f"scheduler.params.{n}", "is still 'auto'; an integration must resolve it")
                           for n in autos])
    if config.type != "WarmupLR" and params.total_num_steps is None:
        raise ConfigError([("scheduler.params.total_num_steps", f"is required by {config.type}")])
    if config.type == "WarmupLR":
        return WarmupLR(optimizer, params.warmup_min_lr, params.warmup_max_lr, params.warmup_num_steps,
                        params.warmup_type)
    if config.type == "WarmupDecayLR":
        return WarmupDecayLR(optimizer, params.total_num_steps, warmup_min_lr=params.warmup_min_lr,
                             warmup_max_lr=params.warmup_max_lr, warmup_num_steps=params.warmup_num_steps,
                             warmup_type=params.warmup_type)
    return WarmupCosineLR(optimizer, params.total_num_steps, params.warmup_min_ratio, params.warmup_num_steps,
                          params.cos_min_ratio, params.warmup_type)
