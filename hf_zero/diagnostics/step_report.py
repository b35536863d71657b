"""Per-step wall-clock breakdown (``wall_clock_breakdown``) and memory report (``memory_breakdown``).

Off by default: the engine then holds no ``StepTimers`` and pays one ``None`` check per
phase. On the CPU phases are host wall-clock. On CUDA a host timer measures only how long
the host took to *queue* the work, so each phase records a pair of CUDA events on the
current stream instead, and the report reads their elapsed times: the device time between
the phase's first and last queued operation. Nothing waits for them during the step; the
report synchronises on the recorded events (every ``steps_per_print`` steps), which
is also when ``time/step_s`` is taken, so the host clock then covers finished device work.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict
from typing import Iterator, Optional

import torch

PHASES = ("forward", "backward", "reduction_wait", "optimizer", "allgather")


class StepTimers:
    """Seconds per phase, accumulated since the last report."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tokens = 0
        self.steps = 0
        self.cuda = device.type == "cuda"
        # CUDA: (phase, start, end) not yet read
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._last = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            # CUDA-only branch: events on the current stream, read at the report.
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((name, start, end))
            return
        start_s = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start_s

    def _read_events(self) -> None:
        if not self._events:
            return
        for name, start, end in self._events:
            end.synchronize()   # (complete already but for the last ones; a phase may have run on another stream)
            self.seconds[name] += start.elapsed_time(end) / 1000.0   # ms -> s
        self._events.clear()

    def summary(self) -> dict[str, float]:
        self._read_events()
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
