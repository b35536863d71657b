"""Copying updated fp32 masters into the parameters' chunks, off the update's critical path.

On CUDA the copies are non-blocking host->device transfers on a side stream (the masters are
pinned); on the CPU a single background thread does them (torch copies release the GIL), so
the copy of sub-group i overlaps the update of sub-group i+1 either way. ``submit`` returns a
handle whose ``wait()`` says the sources may be overwritten.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch


class _Done:
    def wait(self) -> None:
        pass


class _CudaCopies:   # CUDA-only branch: stream + event
    def __init__(self, event):
        self.event = event

    def wait(self) -> None:
        self.event.synchronize()


class _ThreadCopies:
    def __init__(self, future: Future):
        self.future = future

    def wait(self) -> None:
        self.future.result()


def _copy_all(copies: list[tuple[torch.Tensor, torch.Tensor]], after) -> None:
    with torch.no_grad():
        for dst, src in copies:
            dst.copy_(src)
    if after is not None:
        after([dst for dst, _ in copies])


class WriteBack:
    def __init__(self, on_accelerator: bool):
        self._stream = torch.cuda.Stream() if on_accelerator and torch.cuda.is_available() else None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: list = []

    def submit(self, copies: list[tuple[torch.Tensor, torch.Tensor]], after=None):
        """Start ``dst.copy_(src)`` for every pair; returns a handle with ``wait()``.
        ``after(dsts)`` runs once the copies are done (host copies only: on the thread)."""
        if not copies:
            return _Done()
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for dst, src in copies:
                    dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            handle = _CudaCopies(event)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="hf_zero-writeback")
            handle = _ThreadCopies(self._pool.submit(_copy_all, copies, after))
        self._pending.append(handle)
        return handle

    def wait_all(self) -> None:
        pending, self._pending = self._pending, []
        for handle in pending:
            handle.wait()
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)

    def close(self) -> None:
        self.wait_all()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
