"""Copying updated fp32 masters into the parameters' chunks, off the update's critical path.

On CUDA the copies are non-blocking host->device transfers on a side stream; on the CPU a
single background thread does them (torch copies release the GIL), so the copy of sub-group
i overlaps the update of sub-group i+1 either way. ``submit`` returns a handle whose
``wait()`` says the sources may be overwritten.

[Note: copy-back on CUDA]
A non-blocking fp32 host -> bf16 device copy would convert on the device through an fp32
temporary as large as the slice (4 bytes x ``sub_group_size``: 4 GB at the default),
allocated from the side stream's pool and kept reserved there. Instead the host casts the
updated fp32 masters into a page-locked buffer of the parameters' dtype (one of two slots,
each one sub-group long), and the side stream DMAs those bytes, half of fp32's, into the
parameter chunks; no device memory beyond the parameters is touched. fp32 parameters are
copied straight from the (pinned) masters. Who waits on whom: the side stream waits on the
compute stream before each submit (the chunks may still be read by queued work, e.g. the
previous step's all-gather); the host waits on a slot's event before casting into it again
(sub-group i+2 reuses i's slot, so at most one copy is in flight per slot); ``wait_all``
makes the compute stream wait on the side stream, so the all-gather that follows the step
reads the new values, and synchronises every handle, so the masters the copies read may be
changed by the next step. Cost: two sub-groups of page-locked memory in the parameters'
dtype (4 bytes per element of the largest sub-group for bf16), kept for the run.
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


class _PinnedSlot:   # CUDA-only: one sub-group of page-locked low-precision staging
    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.event: Optional[torch.cuda.Event] = None   # the side-stream copy that last read this slot

    def buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if dtype not in self.buffers:
            self.buffers[dtype] = torch.empty(numel, dtype=dtype, pin_memory=True)
        return self.buffers[dtype]


class WriteBack:
    def __init__(self, on_accelerator: bool, staging_numel: int = 0):
        """``on_accelerator``: the parameter chunks are CUDA tensors (decided by the caller from
        the parameters' device); ``staging_numel``: the longest sub-group (slot size)."""
        self._stream = torch.cuda.Stream() if on_accelerator else None
        self._slots = (_PinnedSlot(), _PinnedSlot()) if on_accelerator else ()
        self._staging_numel = staging_numel
        self._num_submits = 0
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: list = []

    def submit(self, copies: list[tuple[torch.Tensor, torch.Tensor]], after=None):
        """Start ``dst.copy_(src)`` for every pair; returns a handle with ``wait()``.
        ``after(dsts)`` runs once the copies are done (host copies only: on the thread)."""
        if not copies:
            return _Done()
        handle: _CudaCopies | _ThreadCopies
        if self._stream is not None:
            handle = _CudaCopies(self._submit_cuda(self._stream, copies))
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="hf_zero-writeback")
            handle = _ThreadCopies(self._pool.submit(_copy_all, copies, after))
        self._pending.append(handle)
        return handle

    def _submit_cuda(self, stream: torch.cuda.Stream, copies: list[tuple[torch.Tensor, torch.Tensor]]):
        """CUDA-only branch ([Note: copy-back on CUDA]): host cast into a pinned slot, then
        one DMA per slice on the side stream; returns the event recorded after them."""
        slot = self._slots[self._num_submits % 2]
        self._num_submits += 1
        if slot.event is not None:
            slot.event.synchronize()   # the copy that read this slot two submits ago is done
        sources, offset = [], 0
        for dst, src in copies:
            if dst.dtype == src.dtype:
                sources.append(src)
                continue
            staged = slot.buffer(dst.dtype, self._staging_numel).narrow(0, offset, src.numel())
            staged.copy_(src)   # fp32 -> bf16/fp16 on the host (round to nearest even, as on the device)
            sources.append(staged)
            offset += src.numel()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for (dst, _), src in zip(copies, sources):
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        slot.event = event
        return event

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
