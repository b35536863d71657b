"""Loss scaling for fp16 with DeepSpeed's dynamic-scale semantics."""

from __future__ import annotations

from hf_zero.config.schema import FP16Config


class LossScaler:
    """Static scale (1.0 when fp16 is off). ``update`` is a no-op."""

    dynamic = False

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, overflow: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class LossScaleAtMinimumError(RuntimeError):
    """Gradients overflowed with the scale already at ``min_loss_scale`` (DeepSpeed stops too)."""


class DynamicLossScaler(LossScaler):
    """DeepSpeed 0.19.8's ``DynamicLossScaler``, update for update. Starts at
    2**initial_scale_power. A clean update at iteration ``i`` (0-based, every update counts)
    doubles the scale when ``stable = i - last_overflow_iteration - 1`` is positive and a
    multiple of ``window``: the first doubling comes after ``window + 1`` clean updates (one
    more than "window clean steps" suggests), and ``window`` more after each doubling. An
    overflow spends one unit of hysteresis, or halves the scale (never below ``min_scale``)
    when one unit is left; hysteresis refills when the scale grows, or after every clean update
    with ``consecutive_hysteresis``. An overflow needing a halving at ``min_scale`` raises
    LossScaleAtMinimumError, as DeepSpeed's ZeRO optimizers do."""

    dynamic = True

    def __init__(self, initial_scale_power: int = 16, window: int = 1000, hysteresis: int = 2,
                 min_scale: float = 1.0, consecutive_hysteresis: bool = False, factor: float = 2.0):
        super().__init__(2.0 ** initial_scale_power)
        self.window = window
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self.consecutive_hysteresis = consecutive_hysteresis
        self.factor = factor
        self.remaining_hysteresis = hysteresis
        self.iteration = 0
        self.last_overflow_iteration = -1

    def update(self, overflow: bool) -> None:
        if overflow:
            if self.hysteresis == 1 or self.remaining_hysteresis == 1:
                if self.scale == self.min_scale:
                    raise LossScaleAtMinimumError(
                        f"fp16 gradients overflowed with the loss scale already at fp16.min_loss_scale "
                        f"({self.min_scale}); DeepSpeed stops the run here too. Lower the learning rate, "
                        "check the data/model for inf/nan, lower fp16.min_loss_scale, or train in bf16")
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self.remaining_hysteresis -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if self.consecutive_hysteresis:
                self.remaining_hysteresis = self.hysteresis
            stable = self.iteration - self.last_overflow_iteration - 1
            if stable > 0 and stable % self.window == 0:
                if not self.consecutive_hysteresis:
                    self.remaining_hysteresis = self.hysteresis
                self.scale *= self.factor
        self.iteration += 1

    def state_dict(self) -> dict:
        return {"scale": self.scale, "remaining_hysteresis": self.remaining_hysteresis,
                "iteration": self.iteration, "last_overflow_iteration": self.last_overflow_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.remaining_hysteresis = int(state["remaining_hysteresis"])
        self.iteration = int(state["iteration"])
        self.last_overflow_iteration = int(state["last_overflow_iteration"])


def build_loss_scaler(fp16: FP16Config) -> LossScaler:
    if fp16.enabled is not True:
        return LossScaler(1.0)
    if fp16.loss_scale > 0:
        return LossScaler(fp16.loss_scale)
    return DynamicLossScaler(fp16.initial_scale_power, fp16.loss_scale_window, fp16.hysteresis,
                             fp16.min_loss_scale, fp16.consecutive_hysteresis)
