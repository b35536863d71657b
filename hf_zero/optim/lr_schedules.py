"""DeepSpeed's WarmupLR, WarmupDecayLR and WarmupCosineLR as torch LR schedulers.

[Note: schedule position] DeepSpeed 0.19.8's schedules keep ``last_batch_iteration`` (``i``),
-1 at construction, and its engine calls ``step()`` only after an optimizer step that was not
skipped (never at init). The lr used by optimizer step ``k`` (1-based) is therefore the
schedule at ``i = k - 2``, and ``i = -1`` means "not started": ``warmup_min_lr`` for
WarmupLR/WarmupDecayLR, a ratio of 0 for WarmupCosineLR. Under warmup (``W = max(2,
warmup_num_steps)``) ``log`` gives gamma = ln(i + 1) / ln(W) and ``linear`` gamma = i / W, so
the first two steps both use the minimum. A torch scheduler steps once at construction, so
``last_epoch`` counts the scheduler steps after optimizer steps and ``i = last_epoch - 1``.
The same holds for the HF Trainer / accelerate protocol (scheduler built, then ``step()``
after each optimizer step that was not skipped), which is how DeepSpeed's engine drives it too.
"""

from __future__ import annotations

import math
from typing import Optional, cast

import torch
from torch.optim.lr_scheduler import LRScheduler

from hf_zero.config.schema import AUTO, SchedulerConfig

# DeepSpeed's WarmupDecayLR signature defaults warmup_max_lr to 0.001 (WarmupLR's to the
# optimizer's lr); a config that omits the key gets DeepSpeed's value.
DEEPSPEED_DECAY_DEFAULT_MAX_LR = 0.001


def _warmup_gamma(iteration: int, warmup_steps: int, warmup_type: str) -> float:
    if warmup_type == "log":
        return math.log(iteration + 1) / math.log(warmup_steps)
    return iteration / warmup_steps


class WarmupLR(LRScheduler):
    """lr = min_lr + (max_lr - min_lr) * gamma(i) during warmup, then max_lr; ``i`` as in
    [Note: schedule position]. ``warmup_max_lr=None``: each group's own lr (DeepSpeed's rule)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_min_lr: float = 0.0,
                 warmup_max_lr: Optional[float] = None, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_epoch: int = -1):
        self.min_lr = warmup_min_lr
        self.max_lr = warmup_max_lr   # None: base_lrs, per group
        self.warmup_steps = max(2, warmup_num_steps)
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_epoch)

    def _gamma(self, iteration: int) -> float:
        if iteration < self.warmup_steps:
            return _warmup_gamma(iteration, self.warmup_steps, self.warmup_type)
        return 1.0

    def get_lr(self) -> list[float | torch.Tensor]:
        iteration = self.last_epoch - 1          # DeepSpeed's last_batch_iteration
        max_lrs = self.base_lrs if self.max_lr is None else [self.max_lr] * len(self.base_lrs)
        if iteration < 0:
            return [self.min_lr for _ in max_lrs]
        gamma = self._gamma(iteration)
        return [self.min_lr + (max_lr - self.min_lr) * gamma for max_lr in max_lrs]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at ``total_num_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int,
                 warmup_max_lr: Optional[float] = DEEPSPEED_DECAY_DEFAULT_MAX_LR, **kwargs):
        self.total_steps = total_num_steps
        super().__init__(optimizer, warmup_max_lr=warmup_max_lr, **kwargs)

    def _gamma(self, iteration: int) -> float:
        if iteration < self.warmup_steps:
            return _warmup_gamma(iteration, self.warmup_steps, self.warmup_type)
        return max(0.0, (self.total_steps - iteration) / max(1.0, self.total_steps - self.warmup_steps))


class WarmupCosineLR(LRScheduler):
    """Ratio of each group's initial lr: 0 before the schedule starts, warmup from
    ``warmup_min_ratio`` to 1, then a cosine down to ``cos_min_ratio`` at ``total_num_steps``
    where it stays."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int,
                 warmup_min_ratio: float = 0.0, warmup_num_steps: int = 1000,
                 cos_min_ratio: float = 1e-4, warmup_type: str = "log", last_epoch: int = -1):
        self.total_steps = total_num_steps
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_steps = max(2, warmup_num_steps)
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_epoch)

    def _ratio(self, iteration: int) -> float:
        if iteration < 0:   # DeepSpeed returns 0.0 before its first step(), not warmup_min_ratio
            return 0.0
        if iteration < self.warmup_steps:
            gamma = _warmup_gamma(iteration, self.warmup_steps, self.warmup_type)
            return self.warmup_min_ratio + gamma * (1.0 - self.warmup_min_ratio)
        progress = (iteration - self.warmup_steps + 1) / max(1, self.total_steps - self.warmup_steps)
        cosine = (1 + math.cos(math.pi * min(1.0, progress))) / 2   # clamped: stays at the floor
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float | torch.Tensor]:
        return [base * self._ratio(self.last_epoch - 1) for base in self.base_lrs]


def position_after(last_batch_iteration: int) -> int:
    """hf_zero's ``last_epoch`` for DeepSpeed's ``last_batch_iteration`` ([Note: schedule position])."""
    return max(-1, int(last_batch_iteration)) + 1


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
    nulls = [name for name in ("warmup_min_lr", "warmup_num_steps") if getattr(params, name) is None]
    if nulls:   # the parser lets null through for AutoFloat/AutoInt fields; these two need a number
        raise ConfigError([(f"scheduler.params.{n}", "must be a number, not null") for n in nulls])
    # Past the checks above no field is "auto" (the str of AutoFloat/AutoInt), only
    # warmup_max_lr may be None, and total_num_steps is set wherever it is used.
    min_lr, num_steps = cast(float, params.warmup_min_lr), cast(int, params.warmup_num_steps)
    max_lr, total_steps = cast(Optional[float], params.warmup_max_lr), cast(int, params.total_num_steps)
    if config.type == "WarmupLR":
        return WarmupLR(optimizer, min_lr, max_lr, num_steps, params.warmup_type)
    if config.type == "WarmupDecayLR":
        max_lr = DEEPSPEED_DECAY_DEFAULT_MAX_LR if max_lr is None else max_lr
        return WarmupDecayLR(optimizer, total_steps, warmup_max_lr=max_lr, warmup_min_lr=min_lr,
                             warmup_num_steps=num_steps, warmup_type=params.warmup_type)
    return WarmupCosineLR(optimizer, total_steps, params.warmup_min_ratio, num_steps,
                          params.cos_min_ratio, params.warmup_type)
