"""Stage 3's pass state: which pass is running, and the transitions allowed between passes.

[Note: stage-3 pass state]
A *pass* is what happens between two quiet points of the model: a training forward and
its backward, or a no-grad forward. Per-unit bookkeeping (stages/stage3.py's release rule)
belongs to one pass and must not leak into the next, and no unit may stay gathered across
an optimizer step (its values would be stale). The phases:

    IDLE --forward with grad--> FORWARD --forward returns--> AWAITING_BACKWARD
    AWAITING_BACKWARD --first gradient reaches the outputs--> BACKWARD --backward ends--> IDLE
    AWAITING_BACKWARD --forward with grad--> FORWARD      (two forwards, one backward of their sum)
    AWAITING_BACKWARD --no-grad forward--> NESTED_NO_GRAD --returns--> AWAITING_BACKWARD
                                           (a teacher / reference pass between forward and backward)
    IDLE --no-grad forward--> NO_GRAD --returns--> IDLE

Leaving the graph: the optimizer step (``after_step``) ends any pass (a forward with grad
whose loss was never backpropagated, a forward that raised) by releasing every unit and
clearing the per-pass counters; so does a forward that starts while another is still
running (the earlier one raised). A nested no-grad pass releases only what it gathered
itself, so the pending backward finds its units as it left them; anything released is
gathered again by the unit's pre-backward hook. Every other transition is a bug and raises.
"""

from __future__ import annotations

import enum


class PassPhase(enum.Enum):
    IDLE = "idle"
    FORWARD = "forward"                      # a forward with grad is running
    AWAITING_BACKWARD = "awaiting_backward"  # forward(s) with grad done, their backward not started
    BACKWARD = "backward"
    NO_GRAD = "no_grad"                      # a no-grad forward outside any training pass
    NESTED_NO_GRAD = "nested_no_grad"        # a no-grad forward while a backward is pending


_ALLOWED = {
    PassPhase.IDLE: {PassPhase.FORWARD, PassPhase.NO_GRAD},
    PassPhase.FORWARD: {PassPhase.AWAITING_BACKWARD},
    PassPhase.AWAITING_BACKWARD: {PassPhase.BACKWARD, PassPhase.FORWARD, PassPhase.NESTED_NO_GRAD},
    PassPhase.BACKWARD: {PassPhase.IDLE},
    PassPhase.NO_GRAD: {PassPhase.IDLE},
    PassPhase.NESTED_NO_GRAD: {PassPhase.AWAITING_BACKWARD},
}

# A forward that starts in one of these phases means the previous forward never returned.
INTERRUPTED = {PassPhase.FORWARD, PassPhase.NO_GRAD, PassPhase.NESTED_NO_GRAD}


class PassState:
    phase: PassPhase

    def __init__(self):
        self.phase = PassPhase.IDLE

    def enter(self, phase: PassPhase) -> None:
        if phase not in _ALLOWED[self.phase]:
            raise RuntimeError(f"hf_zero stage 3: pass state cannot go from {self.phase.value} to {phase.value} "
                               "(this is a bug in hf_zero's pass bookkeeping, please report it)")
        self.phase = phase

    def reset(self) -> None:
        """The pass ended outside the graph (optimizer step, a forward that raised)."""
        self.phase = PassPhase.IDLE
