"""Never silently not ZeRO: under ``hf-zero launch`` a script must end up training a model
sharded by hf_zero, or say loudly that it did not.

[Note: the unsharded-run guard]
The bootstrap patches ``transformers.Trainer`` and ``accelerate.Accelerator.prepare``; a
script that trains some other way (its own loop under plain torch DDP, a ``Trainer``
subclass imported from a library before the patch, a model prepared without its optimizer)
would otherwise run as plain data parallelism while its user believes it runs ZeRO.
:func:`install` records every ``ZeroEngine`` built in the process and adds a global
optimizer step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``):

- at the first optimizer step of any optimizer while no engine exists, every rank logs an
  error naming what to do and raises :class:`UnshardedRunError` (the step never runs, the
  launch exits non-zero);
- when the script returns and no engine was ever built (no optimizer step at all, e.g. an
  evaluation script), :func:`check_at_exit` logs the same error and the bootstrap exits
  with status :data:`EXIT_UNSHARDED`.

``HF_ZERO_ALLOW_UNSHARDED=1`` (``hf-zero launch --allow-unsharded``) turns both into one
warning per rank and keeps the script's own exit status. When an engine exists, each rank
prints one ``hf_zero: rank R ...`` summary line at exit with its stage and model-state bytes,
so a log shows that ZeRO really ran.
"""

from __future__ import annotations

import json
import sys
import weakref
from typing import Any

from hf_zero.integrations.common import ALLOW_UNSHARDED_ENV, allow_unsharded

EXIT_UNSHARDED = 3
SUMMARY_PREFIX = "hf_zero summary: "

_engines: "weakref.WeakSet[Any]" = weakref.WeakSet()
_first_step_summaries: dict[int, dict] = {}   # engine number -> summary after its first optimizer step
# engines ever built: a script may drop its engine (and the GC collect it) before exiting
_state = {"installed": False, "warned": False, "built": 0}


class UnshardedRunError(RuntimeError):
    """A script under ``hf-zero launch`` trained without any model sharded by hf_zero."""


def _rank() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f"rank {dist.get_rank()} of {dist.get_world_size()}"
    return "rank 0 of 1"


def unsharded_message(when: str) -> str:
    return (f"hf_zero ({_rank()}): {when} but no model was sharded by hf_zero: this run is NOT ZeRO "
            f"(plain data parallelism or a single process). hf-zero launch shards models passed to "
            f"transformers.Trainer (and subclasses carrying HfZeroTrainerMixin) and to "
            f"accelerate's Accelerator.prepare together with their optimizer; for another loop call "
            f"hf_zero.initialize(model, config) or hf_zero.prepare_accelerate(accelerator, model, optimizer). "
            f"To run unsharded on purpose set {ALLOW_UNSHARDED_ENV}=1 (hf-zero launch --allow-unsharded).")


def _emit(line: str) -> None:
    """One write per line: the ranks share the launcher's stderr, and ``print`` writes the text
    and its newline separately, so two ranks' lines could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _report(when: str) -> bool:
    """Log the unsharded-run message; True when it is an error (no opt-out)."""
    # printed, not only logged: the script may have configured logging away (or not at all)
    if allow_unsharded():
        if not _state["warned"]:
            _emit("WARNING " + unsharded_message(when))
            _state["warned"] = True
        return False
    _emit("ERROR " + unsharded_message(when))
    return True


def _first_step_check(optimizer: Any, args: Any, kwargs: Any) -> None:
    if _state["built"] or _state["warned"]:
        return
    if _report(f"the first optimizer step ({type(optimizer).__name__}) was reached"):
        raise UnshardedRunError("no model was sharded by hf_zero before the first optimizer step (see the "
                                "message above; HF_ZERO_ALLOW_UNSHARDED=1 lets it run)")


def install() -> None:
    """Record engines as they are built and check the first optimizer step (idempotent)."""
    if _state["installed"]:
        return
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from hf_zero.engine import ZeroEngine

    original_init = ZeroEngine.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _engines.add(self)
        _state["built"] += 1
        self._hf_zero_guard_number = number = _state["built"]
        engine_ref = weakref.ref(self)

        def record(optimizer: Any, args: Any, kwargs: Any) -> None:
            engine = engine_ref()
            if engine is not None and number not in _first_step_summaries:
                _first_step_summaries[number] = summary(engine)

        self.optimizer.register_step_post_hook(record)

    setattr(ZeroEngine, "__init__", recording_init)   # patched on purpose: every engine built is recorded
    register_optimizer_step_pre_hook(_first_step_check)
    _state["installed"] = True


def engines() -> list:
    return list(_engines)


def check_at_exit() -> int:
    """The bootstrap's exit status once the script returned: 0, or EXIT_UNSHARDED."""
    if not _state["built"]:
        return EXIT_UNSHARDED if _report("the script finished") else 0
    # live engines: as they are now; engines the script dropped: as after their first step
    found = dict(_first_step_summaries)
    for engine in engines():
        try:
            found[engine._hf_zero_guard_number] = summary(engine)
        except Exception:   # noqa: BLE001 - a destroy()ed engine cannot report; its first-step summary stands
            pass
    for number in sorted(found):
        _emit(SUMMARY_PREFIX + json.dumps(found[number]))
    return 0


def summary(engine: Any) -> dict:
    """This rank's proof that ZeRO ran: stage, world size, parameter count, model-state bytes."""
    memory = engine.memory_breakdown()
    return {"rank": engine.comm.rank, "world_size": engine.world_size,
            "stage": engine.config.zero_optimization.stage,
            "numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()),
            "dtype": str(engine.dtype).replace("torch.", ""),
            "memory": {k: int(v) for k, v in memory.items()}}
