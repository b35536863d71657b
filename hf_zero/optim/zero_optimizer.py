"""The optimizer users, schedulers and the HF Trainer hold: a real ``torch.optim.Optimizer``.

It shares ``param_groups`` and ``state`` with an inner elementwise torch optimizer whose
parameters are this rank's fp32 master chunks, so LR schedulers that edit
``param_groups[i]["lr"]`` steer the real update. ``step()`` is the whole ZeRO step:
wait for reductions, global norm (with the fp16 overflow check folded in), one
unscale x clip multiply, the inner update, write-back and the all-gather of partitions.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Optional

import torch

from hf_zero.comm import Collectives
from hf_zero.optim.fused_step import FusedAdamW
from hf_zero.optim.grad_norm import clip_coefficient, global_grad_norm
from hf_zero.optim.loss_scaler import LossScaler
from hf_zero.stages.base import ZeroStage

if TYPE_CHECKING:
    from hf_zero.offload.protocol import OptimizerOffload

logger = logging.getLogger(__name__)


class ZeroOptimizer(torch.optim.Optimizer):
    step_was_skipped: bool
    """True when the last step() skipped the update (fp16 overflow on any rank)."""

    def __init__(self, inner: torch.optim.Optimizer, stage: ZeroStage, offload: "OptimizerOffload",
                 scaler: LossScaler, comm: Collectives, gradient_clipping: float):
        super().__init__([{"params": []}], dict(inner.defaults))
        # Share, don't copy: schedulers and users edit these very dicts.
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.inner = inner
        self.stage = stage
        self.offload = offload          # where masters/states live and how the update walks them
        self.masters = offload.masters
        self.scaler = scaler
        self.comm = comm
        self.gradient_clipping = gradient_clipping
        self.step_was_skipped = False
        self.num_skipped_steps = 0
        self._last_norm: Optional[torch.Tensor] = None   # device scalar; read lazily (no host sync)
        self._norm_cache: Optional[tuple] = None   # (stage.grads_version, (norm, overflow flag))

    @property
    def fused(self) -> Optional[FusedAdamW]:
        """hf_zero_kernels' fused AdamW when it is the update strategy (``fused_kernels: "triton"``)."""
        return self.offload.update

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The full gradient's norm (unscaled, before clipping) at the last step."""
        return None if self._last_norm is None else float(self._last_norm.item())

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("hf_zero's optimizer does not take a closure")
        norm, overflow_flag = self._norm_and_overflow()
        self._norm_cache = None
        grads = self.stage.owned_grads()
        scale = self.stage.grad_divisor * self.scaler.scale
        self._last_norm = norm
        if self.scaler.dynamic:
            # The one host read of the step: the scale for the next backward depends on it.
            overflow = bool((~torch.isfinite(norm) | (overflow_flag > 0)).item())
            self.scaler.update(overflow)
            if overflow:
                self.step_was_skipped = True
                self.num_skipped_steps += 1
                logger.info("hf_zero: gradient overflow, step skipped; loss scale now %s", self.scaler.scale)
                self.stage.zero_grad()
                return None
        self.step_was_skipped = False
        coefficient = clip_coefficient(norm, self.gradient_clipping) / scale
        self.offload.step(grads, coefficient, overflow_flag if self.scaler.dynamic else None)
        self.stage.after_step()
        self.stage.zero_grad()
        return None

    def grad_norm(self) -> torch.Tensor:
        """The global norm of the current gradient (unscaled, before clipping): what
        ``clip_grad_norm_`` returns under the Trainer / accelerate. The next ``step()`` reuses
        it while no backward or ``zero_grad`` intervened, so asking costs no second pass."""
        return self._norm_and_overflow()[0]

    def _norm_and_overflow(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 norm, fp32 non-finite flag), computed once per gradient version."""
        self.stage.wait_for_reductions()
        version = self.stage.grads_version
        if self._norm_cache is not None and self._norm_cache[0] == version:
            return self._norm_cache[1]
        flat_grads = [g for group in self.stage.owned_grads() for g in group]
        # Owned gradients hold (rank-averaged gradient) x grad_divisor x loss_scale
        # (stages/base.py): dividing by ``scale`` gives the true gradient.
        scale = self.stage.grad_divisor * self.scaler.scale
        norm, nonfinite = global_grad_norm(flat_grads, self.comm, self.stage.partitions_optimizer,
                                           self.offload.norm_backend)
        result = (norm / scale, nonfinite)
        self._norm_cache = (version, result)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._norm_cache = None
        self.stage.zero_grad()

    def state_dict(self) -> dict:
        """torch's state dict of this rank's shards. State that lives outside memory (nvme, or
        the chunk straddling a partial-offload boundary) is in it as 0-byte placeholders that
        torch.save writes but cannot load back: that is said, rather than saved silently."""
        placeholders = sum(t.numel() > 0 and t.untyped_storage().nbytes() == 0 for s in self.inner.state.values()
                           for t in s.values() if isinstance(t, torch.Tensor))
        if placeholders:
            warnings.warn(f"optimizer.state_dict(): {placeholders} optimizer state tensor(s) of this rank live outside "
                          "memory (offload_optimizer on nvme, or the chunk at the offload_optimizer.ratio boundary) "
                          "and are returned as empty placeholders; save and restore the optimizer with "
                          "engine.save_checkpoint / engine.load_checkpoint", stacklevel=2)
        return super().state_dict()

    def state_tensors(self) -> list[torch.Tensor]:
        return ([t for s in self.inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
                + self.offload.split_parts())
