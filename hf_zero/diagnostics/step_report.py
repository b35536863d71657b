"""Per-step wall-clock breakdown (``wall_clock_breakdown``) and memory report (``memory_breakdown``).

Off by default: the engine then holds no ``StepTimers`` and pays one ``None`` check per
phase. Times are host wall-clock; on an accelerator they would need a device synchronize
per phase, which is why this is a diagnostic and not always on.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict
from typing import Iterator, Optional

PHASES = ("forward", "backward", "reduction_wait", "optimizer", "allgather")


class StepTimers:
    """Seconds per phase, accumulated since the last report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tokens = 0
        self.steps = 0
        self._last = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def summary(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = now - self._last
        out = {f"time/{name}_s": self.seconds.get(name, 0.0) / max(1, self.steps) for name in PHASES}
        out["time/step_s"] = elapsed / max(1, self.steps)
        out["tokens_per_sec"] = self.tokens / elapsed if elapsed > 0 else 0.0
        self.seconds.clear()
        self.tokens = 0
        self.steps = 0
        self._last = now
        return out


def timed(timers: Optional[StepTimers], name: str):
    """``with timed(self.timers, "forward"):`` — a no-op context when timing is off."""
    return timers.phase(name) if timers is not None else contextlib.nullcontext()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def format_report(step: int, values: dict[str, float]) -> str:
    parts = []
    for key, value in values.items():
        if key.startswith("time/"):
            parts.append(f"{key.removeprefix('time/').removesuffix('_s')} {value * 1000:.1f} ms")
        elif key.endswith("bytes"):
            parts.append(f"{key} {value / 2**20:.1f} MiB")
        else:
            parts.append(f"{key} {value:,.1f}")
    return f"hf_zero step {step}: " + ", ".join(parts)
