"""Asynchronous, aligned file I/O for swap buffers: background threads, O_DIRECT when possible.

[Note: swap I/O]
Each transfer moves one sub-group between a host buffer and its own file. It is split into
requests of ``REQUEST_BYTES`` served by a small thread pool (``os.preadv`` / ``os.pwritev``
release the GIL), which keeps several requests queued at the device, as an asynchronous
I/O library would. Files are opened with ``O_DIRECT`` so the data bypasses the page cache
(no double buffering in kernel memory, no eviction of other processes' pages); that needs
the buffer address, the file offset and the length to be multiples of the logical block
size, hence ``ALIGN``-aligned buffers and regions padded to ``ALIGN``. Filesystems that
refuse ``O_DIRECT`` (tmpfs, some network and overlay filesystems: ``open`` fails with
EINVAL) get buffered I/O instead; correctness is the same.

Every file is opened per transfer: a swap file removed mid-run fails the next transfer
(an open fd would silently keep the unlinked inode alive). Any error, a short read
included, is raised as ``SwapIOError`` naming the file, the operation and the byte counts.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

ALIGN = 4096                     # bytes; O_DIRECT alignment of addresses, offsets and lengths
REQUEST_BYTES = 8 * 1024 * 1024  # one pread/pwrite; several in flight per transfer


class SwapIOError(RuntimeError):
    """A swap read or write failed; the offloaded optimizer state is incomplete."""


def align_up(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def aligned_buffer(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A 1D uint8 host tensor of ``align_up(nbytes)`` bytes whose address is ``ALIGN``-aligned."""
    nbytes = align_up(nbytes)
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % ALIGN
    return raw.narrow(0, shift, nbytes)   # keeps ``raw`` alive through its storage


def _memoryview(buffer: torch.Tensor) -> memoryview:
    return memoryview(buffer.numpy()).cast("B")   # type: ignore[arg-type]  # ndarray has the buffer protocol; numpy's stubs lack __buffer__


class _Transfer:
    """One file transfer in flight: its request futures and the fd they share."""

    def __init__(self, op: str, path: Path, fd: int, nbytes: int, futures: list[Future]):
        self.op, self.path, self.fd, self.nbytes, self.futures = op, path, fd, nbytes, futures
        self.done = False

    def wait(self) -> None:
        if self.done:
            return
        self.done = True
        errors, moved = [], 0
        for f in self.futures:
            try:
                moved += f.result()
            except OSError as err:
                errors.append(err)
        os.close(self.fd)
        if errors:
            raise SwapIOError(f"hf_zero: NVMe swap {self.op} of {self.path} failed: {errors[0]}") from errors[0]
        if moved != self.nbytes:
            raise SwapIOError(f"hf_zero: NVMe swap {self.op} of {self.path} moved {moved} of {self.nbytes} "
                              "bytes (file truncated or replaced?)")


class AsyncFileIO:
    """Reads and writes whole files into / from aligned host buffers in background threads."""

    def __init__(self, num_threads: int = 4, direct: bool = True):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="hf_zero-swap")

    def _open(self, path: Path, flags: int, op: str) -> int:
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise SwapIOError(f"hf_zero: NVMe swap {op} of {path} failed: {err}") from err
                self.direct = False   # filesystem without O_DIRECT: buffered from now on
        try:
            return os.open(path, flags)
        except OSError as err:
            raise SwapIOError(f"hf_zero: NVMe swap {op} of {path} failed: {err}") from err

    def _submit(self, op: str, path: Path, fd: int, buffer: torch.Tensor, nbytes: int, offset: int) -> _Transfer:
        view = _memoryview(buffer)
        fn = _read_range if op == "read" else _write_range
        futures = [self._pool.submit(fn, fd, view[start:min(start + REQUEST_BYTES, nbytes)], offset + start)
                   for start in range(0, nbytes, REQUEST_BYTES)]
        return _Transfer(op, path, fd, nbytes, futures)

    def read(self, path: Path, buffer: torch.Tensor, nbytes: int, offset: int = 0) -> _Transfer:
        """Start reading ``nbytes`` of ``path`` from byte ``offset`` into the start of ``buffer``
        (all three aligned)."""
        return self._submit("read", path, self._open(path, os.O_RDONLY, "read"), buffer, nbytes, offset)

    def write(self, path: Path, buffer: torch.Tensor, nbytes: int, offset: int = 0) -> _Transfer:
        """Start writing the first ``nbytes`` of ``buffer`` over ``path`` (which exists) from byte
        ``offset`` (all three aligned)."""
        return self._submit("write", path, self._open(path, os.O_WRONLY, "write"), buffer, nbytes, offset)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _read_range(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:   # end of file: the caller reports the short read
            break
        done += n
    return done


def _write_range(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
    return done
