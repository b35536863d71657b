"""``offload_optimizer.device = "nvme"``: each sub-group's masters and Adam states in a file.

Only ``buffer_count`` swap buffers (at least 2) are resident: sub-group i+1 is read into
one while i is updated in another, and i's write runs behind i+1's update ([Note: sub-group
schedule] in step_loop.py, [Note: swap I/O] in swapper.py). A sub-group's file holds one
region per kind (the fp32 master when the parameters are not fp32 host tensors, then
``exp_avg``, ``exp_avg_sq``[, ``max_exp_avg_sq``]), each padded to the I/O alignment; a
buffer holds the same layout. The master and state tensors in ``masters`` / ``inner.state``
keep their shapes but have 0-byte storage, always: checkpoints stream their values through
the swap buffers ([Note: streamed optimizer state] in protocol.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import torch

from hf_zero.optim.master_weights import unallocated_fp32
from hf_zero.offload.step_loop import SubGroupOffload, SubGroupViews
from hf_zero.offload.subgroups import Slice, SubGroup, max_sub_group_numel
from hf_zero.offload.swap_dir import SwapDir, check_swap_dir
from hf_zero.offload.swapper import ALIGN, AsyncFileIO, SwapIOError, aligned_buffer, align_up

FP32 = 4
KEY = "zero_optimization.offload_optimizer"


class _InFlight(Protocol):
    """A transfer or copy started in the background (AsyncFileIO's, or a device copy's event)."""
    def wait(self) -> None: ...


@dataclass
class _Slot:
    buffer: torch.Tensor                       # 1D uint8, aligned: one sub-group's regions
    sub_group: Optional[int] = None            # which sub-group the buffer holds / is loading
    read: Optional[_InFlight] = None           # the read transfer in flight, if any
    pending: list = field(default_factory=list)   # copy-back and write handles reading the buffer


@dataclass(frozen=True)
class _Extent:
    """The part of one kind's element range that one sub-group's file holds."""
    file: Path
    first: int      # byte offset of the part in the file (a multiple of 4, not of ALIGN)
    nbytes: int
    element: int    # offset of the part's first element within the requested range

    @property
    def aligned(self) -> tuple[int, int]:
        """The enclosing ALIGN-aligned byte range, what an O_DIRECT transfer moves."""
        return self.first // ALIGN * ALIGN, align_up(self.first + self.nbytes)


class NvmeOffload(SubGroupOffload):
    location = "nvme"
    allocates_masters = False   # a full fp32 copy in memory, even briefly, is what nvme avoids

    def __init__(self, owned_params: list[list[torch.Tensor]], sub_group_size: int, nvme_path: Optional[str],
                 buffer_count: int, pin_memory: bool, rank: int, force_copy: bool = False, on_params_done=None,
                 ratio: float = 1.0):
        super().__init__(owned_params, sub_group_size, force_copy, on_params_done, ratio)
        self.nvme_path, self.rank = nvme_path, rank
        self.num_slots = max(2, buffer_count)
        self.pin = pin_memory and self.on_accelerator   # CUDA parameters only: a CPU run pins nothing
        self.slots: list[_Slot] = []
        self.files: dict[int, Path] = {}   # sub-group index -> its file (offloaded sub-groups only)
        self.swap_dir: Optional[SwapDir] = None
        self.io: Optional[AsyncFileIO] = None

    def _file_io(self) -> AsyncFileIO:
        assert self.io is not None, "the swap files are opened by attach() and closed by close()"
        return self.io

    # ---- layout -------------------------------------------------------------------------
    def _kinds(self) -> tuple[str, ...]:
        return (("master",) if self.masters.keeps_copy else ()) + self.state_keys

    def _stride(self, numel: int) -> int:
        return align_up(numel * FP32)

    def _file_bytes(self, sub_group: SubGroup) -> int:
        return len(self._kinds()) * self._stride(sub_group.numel)

    def _region(self, buffer: torch.Tensor, sub_group: SubGroup, kind_index: int) -> torch.Tensor:
        stride = self._stride(sub_group.numel)
        return buffer.narrow(0, kind_index * stride, sub_group.numel * FP32).view(torch.float32)


    # ---- setup --------------------------------------------------------------------------
    def attach(self, inner: torch.optim.Optimizer, update=None) -> None:
        super().attach(inner, update)
        self.offloaded = self.plan[self.num_on_device:]   # [Note: partial offload]: the others have no file
        needed = sum(self._file_bytes(sg) for sg in self.offloaded)
        root = check_swap_dir(self.nvme_path, needed, KEY)
        self.swap_dir = SwapDir(root, self.rank)
        self.io = AsyncFileIO()
        self.files = {sg.index: self.swap_dir.allocate(f"sub_group_{sg.index:05d}.bin", self._file_bytes(sg))
                      for sg in self.offloaded}
        slot_bytes = max(ALIGN, len(self._kinds()) * self._stride(max_sub_group_numel(self.offloaded)))
        self.slots = [_Slot(aligned_buffer(slot_bytes, self.pin)) for _ in range(self.num_slots)]
        self._slices_of: dict[tuple[int, int], list[tuple[SubGroup, Slice]]] = {}
        for sg in self.offloaded:   # in plan order: a chunk's slices by increasing start
            for s in sg.slices:
                self._slices_of.setdefault((s.group, s.chunk), []).append((sg, s))
        # Masters and states were created swapped out: the masters' initial values come from
        # the parameter chunks, sub-group by sub-group; the states start as zeros.
        self._write_initial()

    def _new_state(self, master: torch.Tensor) -> torch.Tensor:
        # Born swapped out: full-size zeros would cost the very memory offload saves.
        return unallocated_fp32(master.numel(), master.device)

    # ---- setup: every sub-group written once -------------------------------------------
    def _write_initial(self) -> None:
        buffer = self.slots[0].buffer
        for sg in self.offloaded:
            for k, kind in enumerate(self._kinds()):
                region = self._region(buffer, sg, k)
                if kind != "master":
                    region.zero_()
                    continue
                sources = [self.masters.owned_params[s.group][s.chunk].narrow(0, s.start, s.length)
                           for s in sg.slices]
                for s, source in zip(sg.slices, sources):   # model dtype, cast by copy_
                    region.narrow(0, s.offset, s.length).copy_(source)
                if self.on_params_done is not None:   # NVMe-mapped parameter shards: drop what was read
                    self.on_params_done(sources)
            self._file_io().write(self.files[sg.index], buffer, self._file_bytes(sg)).wait()

    def prepare_states(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        return self.state_keys   # created at attach, fixed by the optimizer; they stay swapped out

    # ---- streamed access ([Note: streamed optimizer state] in protocol.py) ----------------
    def _extents(self, kind: str, group: int, chunk: int, start: int, length: int) -> Iterator[_Extent]:
        """Where elements [start, start + length) of ``kind`` of chunk (group, chunk) are, in order:
        one extent per sub-group. Its aligned range lies inside one region of the file, so it fits
        a swap buffer (which holds every region of the largest sub-group)."""
        k = self._kinds().index(kind)
        end = start + length
        for sg, s in self._slices_of.get((group, chunk), []):
            lo, hi = max(start, s.start), min(end, s.start + s.length)
            if lo < hi:
                first = k * self._stride(sg.numel) + (s.offset + lo - s.start) * FP32
                yield _Extent(self.files[sg.index], first, (hi - lo) * FP32, lo - start)

    def _part(self, slot: _Slot, extent: _Extent) -> torch.Tensor:
        offset = extent.first - extent.aligned[0]
        return slot.buffer.narrow(0, offset, extent.nbytes).view(torch.float32)

    def _read_offloaded(self, kind: str, group: int, chunk: int, start: int, length: int) -> Iterator[torch.Tensor]:
        if kind not in self._kinds():   # fp32 host parameters are their own, resident, masters
            yield from super()._read_offloaded(kind, group, chunk, start, length)
            return
        self._check_healthy()
        try:
            self._drain()
            extents = list(self._extents(kind, group, chunk, start, length))
            # Two swap buffers alternate: part i+1 is read while the caller consumes part i.
            if extents:
                self._read_extent(self.slots[0], extents[0])
            for i, extent in enumerate(extents):
                slot = self.slots[i % 2]
                assert slot.read is not None   # started for this extent by _read_extent
                slot.read.wait()
                if i + 1 < len(extents):
                    self._read_extent(self.slots[(i + 1) % 2], extents[i + 1])
                yield self._part(slot, extent)
        except SwapIOError as err:
            self.failed = err
            raise
        finally:   # a caller that stopped early leaves no read running into a buffer
            for slot in self.slots[:2]:
                if slot.read is not None:
                    with contextlib.suppress(SwapIOError):
                        slot.read.wait()

    def _read_extent(self, slot: _Slot, extent: _Extent) -> None:
        lo, hi = extent.aligned
        slot.sub_group, slot.read = None, self._file_io().read(extent.file, slot.buffer, hi - lo, lo)

    def _write_offloaded(self, kind: str, group: int, chunk: int, start: int, length: int,
                         fill: Callable[[int, torch.Tensor], None]) -> None:
        if kind not in self._kinds():
            return super()._write_offloaded(kind, group, chunk, start, length, fill)
        self._check_healthy()
        try:
            self._drain()
            for i, extent in enumerate(self._extents(kind, group, chunk, start, length)):
                # Two swap buffers alternate: part i+1 is filled while part i is written.
                slot = self.slots[i % 2]
                self._wait_pending(slot)
                self._read_partial_blocks(slot, extent)
                part = self._part(slot, extent)
                fill(extent.element, part)
                if kind == "master":
                    self._master_to_param(group, chunk, start + extent.element, part)
                lo, hi = extent.aligned
                slot.pending = [self._file_io().write(extent.file, slot.buffer, hi - lo, lo)]
            # Before returning: the next call may read-modify-write a block this one wrote.
            self._finish()
        except SwapIOError as err:
            self.failed = err
            raise

    def _read_partial_blocks(self, slot: _Slot, extent: _Extent) -> None:
        """O_DIRECT writes whole blocks: a block the extent covers only in part is read first,
        so that its other bytes (a neighbouring piece's elements, padding) are written back
        unchanged. The extents of one call lie in different files, and each call waits for its
        writes, so no block is read here while a write of it is in flight."""
        lo, hi = extent.aligned
        head = extent.first != lo
        tail = extent.first + extent.nbytes != hi
        if head:
            self._file_io().read(extent.file, slot.buffer, ALIGN, lo).wait()
        if tail and not (head and hi - lo == ALIGN):
            last_block = slot.buffer.narrow(0, hi - ALIGN - lo, ALIGN)
            self._file_io().read(extent.file, last_block, ALIGN, hi - ALIGN).wait()

    # ---- the step's storage hooks -------------------------------------------------------
    def _slot(self, sub_group: SubGroup) -> _Slot:
        return self.slots[sub_group.index % self.num_slots]

    def _prefetch(self, sub_group: SubGroup) -> None:
        slot = self._slot(sub_group)
        if slot.sub_group == sub_group.index and slot.read is not None:
            return
        self._wait_pending(slot)
        slot.sub_group = sub_group.index
        slot.read = self._file_io().read(self.files[sub_group.index], slot.buffer, self._file_bytes(sub_group))

    def _acquire(self, sub_group: SubGroup) -> SubGroupViews:
        self._prefetch(sub_group)
        slot = self._slot(sub_group)
        assert slot.read is not None   # started or found in flight by _prefetch
        slot.read.wait()
        kinds = self._kinds()
        regions = {kind: self._region(slot.buffer, sub_group, k) for k, kind in enumerate(kinds)}

        def slices(kind: str) -> list[torch.Tensor]:
            return [regions[kind].narrow(0, s.offset, s.length) for s in sub_group.slices]

        if "master" in regions:
            masters = slices("master")
        else:   # fp32 host parameters are their own masters (not swapped)
            masters = [self.masters.masters[s.group][s.chunk].narrow(0, s.start, s.length)
                       for s in sub_group.slices]
        return SubGroupViews(masters, {key: slices(key) for key in self.state_keys})

    def _release(self, sub_group: SubGroup, copied) -> None:
        slot = self._slot(sub_group)
        write = self._file_io().write(self.files[sub_group.index], slot.buffer, self._file_bytes(sub_group))
        slot.read, slot.sub_group = None, None   # the next step reads it again
        slot.pending = [copied, write]

    def _wait_pending(self, slot: _Slot) -> None:
        pending, slot.pending = slot.pending, []
        for handle in pending:
            handle.wait()

    def _finish(self) -> None:
        for slot in self.slots:
            self._wait_pending(slot)

    def _drain(self) -> None:
        """Wait for every transfer in flight (reads included) and forget what slots hold."""
        for slot in self.slots:
            if slot.read is not None:
                slot.read.wait()
            slot.read, slot.sub_group = None, None
            self._wait_pending(slot)

    # ---- accounting, teardown -------------------------------------------------------------
    def buffer_tensors(self) -> list[torch.Tensor]:
        return [slot.buffer for slot in self.slots]

    def memory_by_location(self) -> dict[str, int]:
        return {"offload_host": sum(s.buffer.untyped_storage().nbytes() for s in self.slots),
                "offload_nvme": sum(self._file_bytes(sg) for sg in self.offloaded) if self.files else 0}

    def close(self) -> None:
        try:
            self._drain()
        except SwapIOError:
            pass   # tearing down anyway
        super().close()
        if self.io is not None:
            self.io.close()
            self.io = None
        if self.swap_dir is not None:
            self.swap_dir.remove()
            self.swap_dir = None
        self.files = {}
