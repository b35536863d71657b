"""Stage-3 parameter offload: where each rank's parameter shards live at rest.

[Note: parameter offload]
At stage 3 a rank holds, per sharded group, one 1D shard in the model dtype
(sharded_params.py). ``offload_param.device`` picks its storage, and nothing else changes:
every reader and writer (the all-gather, the optimizer's write-back, checkpoints,
``GatheredParameters``) sees an ordinary tensor.

- ``none``: the shard lives with the parameters (the accelerator, or the host on a
  CPU-only machine).
- ``cpu``: the shard lives in host memory (pinned when an accelerator exists); only the
  gathered block is on the accelerator, copied there as the all-gather starts. On a
  CPU-only machine this is the same placement as ``none``.
- ``nvme``: the shard is a shared memory mapping of its own swap file under
  ``nvme_path``. Pages are read when touched and written back by the kernel. After a
  gather has copied the shard, its pages are dropped from the process
  (``MADV_DONTNEED``: resident memory falls back, dirty pages stay safe in the page
  cache until written). Stage 3 asks for the shards of the units next in the recorded
  prefetch order ahead of use (``MADV_WILLNEED``: the kernel reads them asynchronously),
  up to ``buffer_count`` x ``buffer_size`` elements. The optimizer's write-back dirties
  the trainable shards; the pages a sub-group wrote are dropped as soon as its copy is
  done (and at setup, those an NVMe optimizer read to fill its masters). The persistent
  set stays in host memory, and so do the first ``max_in_cpu`` elements of shards in
  build order (the last block first).

Why a mapping rather than explicit reads into pinned buffers (the optimizer-state swapper,
swapper.py): a parameter shard is read by many paths (gathers, checkpoints, the
optimizer's copy-back, ``GatheredParameters``, export), and a mapped tensor serves them all
with no residency protocol to get wrong; the kernel's page cache also keeps recently used
shards as long as memory is free, which makes the backward re-gather of a block a minor
fault. The cost: no ``O_DIRECT`` and no pinned staging (a CUDA copy from mapped pages is
a pageable copy). Files are allocated up front (``posix_fallocate``), so a full disk cannot
surface later as a ``SIGBUS`` on a page write.
"""

from __future__ import annotations

import bisect
import mmap
import os
from typing import Optional

import torch

from hf_zero.offload.swap_dir import SwapDir, check_swap_dir

KEY = "zero_optimization.offload_param"


class ShardCopyIn:
    """How a gather moves this rank's shard into the gathered buffer and issues the all-gather.

    [Note: stage-3 copy-in on CUDA]
    With the shard in host memory (``offload_param`` cpu / nvme) and the parameters on CUDA,
    a copy on the compute stream would block the Python thread (a host->device copy_
    without ``non_blocking`` waits) and could not start before the compute already queued
    there ends, so a prefetch would not overlap anything. As FSDP2 does, two side streams:

    - the gathered buffer's storage is regrown from the all-gather stream's pool (``regrow``), so
      neither side stream has to wait on the compute stream for memory it did not use (the
      copy-in stream waits on the all-gather stream, whose pool it writes into);
    - the copy-in stream copies the (pinned) host shard into this rank's slots of the
      buffer, non-blocking, and records an event; the all-gather stream waits on that event
      and the collective is issued under it (``run``), so NCCL's stream is ordered after
      the copy-in and not after queued compute;
    - the consumer (``consumed``, after the collective's ``work.wait()``, which makes the
      compute stream wait on NCCL's stream) also makes the compute stream wait on the
      all-gather stream and calls ``record_stream`` on the buffer: when the gather is
      released the allocator reuses its memory only once the compute stream has passed
      that point, so an early free cannot hand a block still being read to the next gather.

    The host shard may be rewritten (optimizer copy-back) only after the step's first host
    sync on the compute stream (the norm's device->host read), which comes after every
    backward gather has been consumed, so a copy-in never races the write-back. A shard in
    a mapped NVMe file is pageable: CUDA copies it synchronously through its own staging,
    so the source is free when ``copy_`` returns (dropping its pages right after is safe).
    On the CPU, or with the shard already on the device, everything runs on the current
    stream as plain copies.
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, tuple] = {}   # CUDA device -> (copy-in, all-gather)

    def _cuda_streams(self, device: torch.device) -> tuple:
        if device not in self._streams:   # CUDA-only branch
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    @staticmethod
    def _off_stream(dst: torch.Tensor, src: torch.Tensor) -> bool:
        return dst.device.type == "cuda" and src.device.type == "cpu"

    def regrow(self, full: torch.Tensor, nbytes: int, from_host: bool) -> None:
        """Give the released gathered buffer ``full`` its storage back (``nbytes``);
        ``from_host``: the shard it will receive is in host memory."""
        if not (from_host and full.device.type == "cuda"):
            full.untyped_storage().resize_(nbytes)
            return
        with torch.cuda.stream(self._cuda_streams(full.device)[1]):   # CUDA-only branch
            full.untyped_storage().resize_(nbytes)

    def run(self, copies: list[tuple[torch.Tensor, torch.Tensor]], issue) -> list:
        """``dst.copy_(src)`` for every pair, then ``issue()`` (which starts the collectives
        and returns their works), ordered as the note says."""
        if not copies or not all(self._off_stream(dst, src) for dst, src in copies):
            for dst, src in copies:
                dst.copy_(src)
            return issue()
        copy_in, all_gather = self._cuda_streams(copies[0][0].device)
        # The buffer came from the all-gather stream's pool: write it only after what that
        # stream queued before (never after the compute stream's queued work).
        copy_in.wait_stream(all_gather)
        with torch.cuda.stream(copy_in):
            for dst, src in copies:
                dst.copy_(src, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(copy_in)
        all_gather.wait_event(copied)
        with torch.cuda.stream(all_gather):
            return issue()

    def consumed(self, full: torch.Tensor) -> None:
        """The compute stream is about to read ``full`` (its collectives were waited on)."""
        streams = self._streams.get(full.device)
        if streams is not None:
            current = torch.cuda.current_stream(full.device)
            current.wait_stream(streams[1])   # world 1: no collective ordered it after the copy-in
            full.record_stream(current)


class ShardStorage:
    """One group's shard, resident in memory (``none`` / ``cpu``)."""

    offloaded = False   # True: in a swap file, reported by the store rather than as resident
    copy_in: ShardCopyIn   # the store's; how gathers copy this shard in ([Note: stage-3 copy-in on CUDA])

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.copy_in = ShardCopyIn()

    def prefetch(self) -> None:
        """Start reading the shard (no-op when resident)."""

    def evict(self) -> None:
        """Drop the shard's pages from this process (no-op when resident)."""


class MappedShard(ShardStorage):
    """One group's shard as a shared mapping of its swap file (``nvme``)."""

    offloaded = True

    def __init__(self, path: os.PathLike, numel: int, dtype: torch.dtype):
        nbytes = numel * dtype.itemsize
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)   # the mapping keeps the file alive
        self.path, self.nbytes = path, nbytes
        super().__init__(torch.frombuffer(self._map, dtype=dtype, count=numel))
        self.start = self.tensor.data_ptr()

    def prefetch(self) -> None:
        self._map.madvise(mmap.MADV_WILLNEED)

    def evict(self) -> None:
        self._map.madvise(mmap.MADV_DONTNEED)

    def evict_bytes(self, start: int, length: int) -> None:
        """Drop the whole pages inside bytes ``[start, start + length)`` of the mapping."""
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (start + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class ParamStore:
    """Allocates the shard storage of every stage-3 group for one ``offload_param`` device."""

    def __init__(self, device: str = "none", *, nvme_path: Optional[str] = None, pin_memory: bool = True,
                 buffer_count: int = 5, buffer_size: int = 100_000_000, max_in_cpu: int = 0, rank: int = 0,
                 expected_bytes: int = 0):
        """``expected_bytes``: this rank's shard bytes (checked against the free space of
        ``nvme_path`` before any shard is built)."""
        self.device = device
        self.pin_memory = pin_memory   # applied to shards of a model on an accelerator only
        self.read_ahead_numel = buffer_count * buffer_size
        self.cpu_budget = max_in_cpu
        self.storages: list[ShardStorage] = []
        self.copy_in = ShardCopyIn()   # one pair of side streams for every shard of this store
        self.num_read_ahead = 0                # shards asked for ahead of use (diagnostics, tests)
        self._mapped: list[MappedShard] = []   # sorted by address (drop_pages' lookup)
        self.swap_dir: Optional[SwapDir] = None
        if device == "nvme":
            root = check_swap_dir(nvme_path, expected_bytes, KEY)
            self.swap_dir = SwapDir(root, rank)

    def allocate(self, numel: int, dtype: torch.dtype, compute_device: torch.device,
                 keep_in_memory: bool = False) -> ShardStorage:
        """Storage for a new group's shard of ``numel`` elements (contents undefined).
        ``keep_in_memory``: the persistent set, refreshed every step, never goes to a file."""
        if self.device == "none":
            storage = ShardStorage(torch.empty(numel, dtype=dtype, device=compute_device))
        elif self.device == "cpu" or not self._goes_to_file(numel, keep_in_memory):
            # CUDA-only branch: page-locked host memory, so the host->device gather copy is an
            # asynchronous DMA; keyed on the compute device (a CPU run pins nothing).
            host = torch.empty(numel, dtype=dtype, pin_memory=self.pin_memory and compute_device.type == "cuda")
            storage = ShardStorage(host)
        else:
            assert self.swap_dir is not None   # device "nvme": opened in __init__
            path = self.swap_dir.allocate(f"shard_{len(self.storages):05d}.bin", numel * dtype.itemsize)
            storage = MappedShard(path, numel, dtype)
            bisect.insort(self._mapped, storage, key=lambda s: s.start)
        storage.copy_in = self.copy_in
        self.storages.append(storage)
        return storage

    def _goes_to_file(self, numel: int, keep_in_memory: bool) -> bool:
        if keep_in_memory:
            return False
        if numel <= self.cpu_budget:   # max_in_cpu: the first shards that fit stay in memory
            self.cpu_budget -= numel
            return False
        return True

    def read_ahead(self, storage: ShardStorage) -> None:
        if storage.offloaded:
            storage.prefetch()
            self.num_read_ahead += 1

    def drop_pages(self, tensors: list[torch.Tensor]) -> None:
        """The optimizer finished reading or writing ``tensors`` (views of shards): drop their pages."""
        for t in tensors:
            address = t.data_ptr()
            i = bisect.bisect_right(self._mapped, address, key=lambda s: s.start) - 1
            if i >= 0 and address < self._mapped[i].start + self._mapped[i].nbytes:
                self._mapped[i].evict_bytes(address - self._mapped[i].start, t.numel() * t.element_size())

    def evict_all(self) -> None:
        for storage in self._mapped:
            storage.evict()

    @property
    def offloads(self) -> bool:
        """Whether ``drop_pages`` can do anything (some shard is in a file)."""
        return bool(self._mapped)

    def memory_by_location(self) -> dict[str, int]:
        """Shard bytes held in host memory by the cpu/nvme backends and in swap files."""
        host = sum(s.tensor.nbytes for s in self.storages if not s.offloaded) if self.device != "none" else 0
        return {"param_host": host, "param_nvme": sum(s.nbytes for s in self._mapped)}

    def close(self) -> None:
        """Remove the swap files; mapped shards stay readable until their tensors are freed."""
        if self.swap_dir is not None:
            self.swap_dir.remove()
            self.swap_dir = None
