"""``offload_optimizer.device = "nvme"``: each sub-group's masters and Adam states in a file.

Only ``buffer_count`` swap buffers (at least 2) are resident: sub-group i+1 is read into
one while i is updated in another, and i's write runs behind i+1's update ([Note: sub-group
schedule] in step_loop.py, [Note: swap I/O] in swapper.py). A sub-group's file holds one
region per kind (the fp32 master when the parameters are not fp32 host tensors, then
``exp_avg``, ``exp_avg_sq``[, ``max_exp_avg_sq``]), each padded to the I/O alignment; a
buffer holds the same layout. Between steps the master and state tensors in
``masters`` / ``inner.state`` keep their shapes but have 0-byte storage; ``resident()``
materialises them (checkpoints) and writes them back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from hf_zero.optim.master_weights import unallocated_fp32
from hf_zero.offload.step_loop import SubGroupOffload, SubGroupViews
from hf_zero.offload.subgroups import SubGroup, max_sub_group_numel
from hf_zero.offload.swap_dir import SwapDir, check_swap_dir
from hf_zero.offload.swapper import AsyncFileIO, SwapIOError, aligned_buffer, align_up

FP32 = 4
KEY = "zero_optimization.offload_optimizer"


@dataclass
class _Slot:
    buffer: torch.Tensor                       # 1D uint8, aligned: one sub-group's regions
    sub_group: Optional[int] = None            # which sub-group the buffer holds / is loading
    read: object = None                        # the read transfer in flight, if any
    pending: list = field(default_factory=list)   # copy-back and write handles reading the buffer


def _swap_out(tensor: torch.Tensor) -> None:
    tensor.untyped_storage().resize_(0)


def _swap_in(tensor: torch.Tensor) -> None:
    tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())


class NvmeOffload(SubGroupOffload):
    location = "nvme"
    allocates_masters = False   # a full fp32 copy in memory, even briefly, is what nvme avoids

    def __init__(self, owned_params: list[list[torch.Tensor]], sub_group_size: int, nvme_path: Optional[str],
                 buffer_count: int, pin_memory: bool, rank: int, force_copy: bool = False):
        super().__init__(owned_params, sub_group_size, force_copy)
        self.nvme_path, self.rank = nvme_path, rank
        self.num_slots = max(2, buffer_count)
        self.pin = pin_memory and torch.cuda.is_available()
        self.slots: list[_Slot] = []
        self.files: list[Path] = []
        self.swap_dir: Optional[SwapDir] = None
        self.io: Optional[AsyncFileIO] = None

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

    def _tensor(self, kind: str, group: int, chunk: int) -> torch.Tensor:
        master = self.masters.masters[group][chunk]
        return master if kind == "master" else self.inner.state[master][kind]

    def _swapped_tensors(self) -> list[torch.Tensor]:
        return [self._tensor(kind, gi, ci) for gi, g in enumerate(self.masters.masters) for ci in range(len(g))
                for kind in self._kinds()]

    # ---- setup --------------------------------------------------------------------------
    def attach(self, inner: torch.optim.Optimizer) -> None:
        super().attach(inner)
        needed = sum(self._file_bytes(sg) for sg in self.plan)
        root = check_swap_dir(self.nvme_path, needed, KEY)
        self.swap_dir = SwapDir(root, self.rank)
        self.io = AsyncFileIO()
        self.files = [self.swap_dir.allocate(f"sub_group_{sg.index:05d}.bin", self._file_bytes(sg))
                      for sg in self.plan]
        slot_bytes = len(self._kinds()) * self._stride(max_sub_group_numel(self.plan))
        self.slots = [_Slot(aligned_buffer(slot_bytes, self.pin)) for _ in range(self.num_slots)]
        # Masters and states were created swapped out: the masters' initial values come from
        # the parameter chunks, sub-group by sub-group; the states start as zeros.
        self._write_all(from_tensors=["master"], masters_from_params=True)
        self._swap_out_all()

    def _new_state(self, master: torch.Tensor) -> torch.Tensor:
        # Born swapped out: full-size zeros would cost the very memory offload saves.
        return unallocated_fp32(master.numel(), master.device)


    # ---- moving whole sub-groups (setup, resident) ---------------------------------------
    def _gather(self, sub_group: SubGroup, buffer: torch.Tensor, kinds: Optional[list[str]] = None,
                masters_from_params: bool = False) -> None:
        """Copy ``kinds`` (default: all) of ``sub_group`` into ``buffer``; other regions become zeros."""
        for k, kind in enumerate(self._kinds()):
            region = self._region(buffer, sub_group, k)
            if kinds is not None and kind not in kinds:
                region.zero_()
                continue
            for s in sub_group.slices:
                if kind == "master" and masters_from_params:
                    source = self.masters.owned_params[s.group][s.chunk]   # model dtype, cast by copy_
                else:
                    source = self._tensor(kind, s.group, s.chunk)
                region.narrow(0, s.offset, s.length).copy_(source.narrow(0, s.start, s.length))

    def _scatter(self, sub_group: SubGroup, buffer: torch.Tensor) -> None:
        for k, kind in enumerate(self._kinds()):
            region = self._region(buffer, sub_group, k)
            for s in sub_group.slices:
                self._tensor(kind, s.group, s.chunk).narrow(0, s.start, s.length).copy_(
                    region.narrow(0, s.offset, s.length))

    def _write_all(self, from_tensors: Optional[list[str]] = None, masters_from_params: bool = False) -> None:
        self._drain()
        buffer = self.slots[0].buffer
        for sg in self.plan:
            self._gather(sg, buffer, from_tensors, masters_from_params)
            self.io.write(self.files[sg.index], buffer, self._file_bytes(sg)).wait()

    def _read_all(self) -> None:
        self._drain()
        buffer = self.slots[0].buffer
        for sg in self.plan:
            self.io.read(self.files[sg.index], buffer, self._file_bytes(sg)).wait()
            self._scatter(sg, buffer)

    @contextlib.contextmanager
    def resident(self, write_back: bool = False) -> Iterator[None]:
        self._check_healthy()
        for t in self._swapped_tensors():
            _swap_in(t)
        try:
            self._read_all()
            yield
            if write_back:
                self._write_all()
        except SwapIOError as err:
            self.failed = err
            raise
        finally:
            self._swap_out_all()

    def _swap_out_all(self) -> None:
        for gi, g in enumerate(self.masters.masters):
            for ci, master in enumerate(g):
                # A storage that was ever exposed to numpy (the checkpoint reader fills through
                # memoryviews) can no longer be resized: give such tensors fresh storage, keeping
                # the tensor objects (they key inner.state and fill param_groups).
                if self.masters.keeps_copy:
                    if master.untyped_storage().resizable():
                        _swap_out(master)
                    else:
                        master.data = self._new_state(master)
                state = self.inner.state[master]
                for key in self.state_keys:   # load_checkpoint may have put new tensors here
                    state[key] = self._new_state(master)

    # ---- the step's storage hooks -------------------------------------------------------
    def _slot(self, sub_group: SubGroup) -> _Slot:
        return self.slots[sub_group.index % self.num_slots]

    def _prefetch(self, sub_group: SubGroup) -> None:
        slot = self._slot(sub_group)
        if slot.sub_group == sub_group.index and slot.read is not None:
            return
        self._wait_pending(slot)
        slot.sub_group = sub_group.index
        slot.read = self.io.read(self.files[sub_group.index], slot.buffer, self._file_bytes(sub_group))

    def _acquire(self, sub_group: SubGroup) -> SubGroupViews:
        self._prefetch(sub_group)
        slot = self._slot(sub_group)
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
        write = self.io.write(self.files[sub_group.index], slot.buffer, self._file_bytes(sub_group))
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
                "offload_nvme": sum(self._file_bytes(sg) for sg in self.plan) if self.files else 0}

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
        self.files = []
