"""The sub-group update loop shared by the cpu and nvme backends.

[Note: sub-group schedule]
For sub-group i (subgroups.py) the loop (1) asks the storage to start fetching i+1
(nvme: an asynchronous read into a free swap buffer; cpu: nothing), (2) waits for i's
views, (3) brings i's gradient slices to the host in fp32 with the unscale x clip
coefficient applied (from the accelerator: downloaded ahead, while i-1 is updated,
[Note: gradient download] in grad_download.py), bit-identically to the 'none' backend's multiply but without a pass
of its own where that stays exact ([Note: folding the coefficient] in grad_pass.py), (4)
runs the CPU Adam(W) (cpu_adam.py) per parameter group present in i, (5) starts copying i's
updated masters into the parameters' chunks on the copy executor (write_back.py) and (6)
hands i back to the storage (nvme: an asynchronous write once that copy is done). So the
copy-back of i and the swap-out of i run while i+1 is updated. The step counters advance
once, after every sub-group, as torch's per-parameter counters would.

With ``offload_optimizer.ratio`` < 1 the first sub-groups stay on the device ([Note:
partial offload] in partial.py): the loop updates them in place there, with the same
kernel and coefficient handling, while the first offloaded sub-group is being fetched.
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from hf_zero.offload.grad_download import GradDownload, downloads_needed
from hf_zero.offload.cpu_adam import adam_update, check_offloadable, new_step_counter, runs_fused, state_keys
from hf_zero.offload.grad_pass import GradPass
from hf_zero.offload.partial import SplitChunk, device_prefixes, device_sub_group_count
from hf_zero.offload.protocol import OptimizerOffload
from hf_zero.offload.subgroups import SubGroup, max_sub_group_numel, plan_sub_groups
from hf_zero.offload.write_back import WriteBack
from hf_zero.optim.master_weights import MasterWeights, unallocated_fp32


@dataclass
class SubGroupViews:
    masters: list[torch.Tensor]              # per slice: 1D fp32 master values (host)
    states: dict[str, list[torch.Tensor]]    # state key -> per slice 1D fp32 (host)


class SubGroupOffload(OptimizerOffload):
    """Runs the [Note: sub-group schedule]; subclasses say where a sub-group's tensors live."""

    updates_on_device = False
    host = torch.device("cpu")

    allocates_masters = True   # nvme: masters are born swapped out and filled from the parameters
    fold_coefficient = True    # False: always a separate multiply pass ([Note: folding the coefficient])
    stage_downloads = None     # True: host gradients go through GradDownload too (tests run its schedule on CPU)

    def __init__(self, owned_params: list[list[torch.Tensor]], sub_group_size: int, force_copy: bool = False,
                 on_params_done: Optional[Callable[[list[torch.Tensor]], None]] = None, ratio: float = 1.0):
        self.on_params_done = on_params_done
        self.plan: list[SubGroup] = plan_sub_groups([[p.numel() for p in g] for g in owned_params], sub_group_size)
        # [Note: partial offload]: the first sub-groups stay on the parameters' device.
        self.num_on_device = device_sub_group_count(len(self.plan), ratio)
        self.device_prefix = device_prefixes(self.plan, self.num_on_device)
        if ratio < 1 and self.plan and not self.num_on_device:
            warnings.warn(f"hf_zero: zero_optimization.offload_optimizer.ratio={ratio} keeps none of this rank's "
                          f"{len(self.plan)} optimizer sub-group(s) on the device (DeepSpeed's int((1 - ratio) * n)): "
                          f"all are offloaded; lower zero_optimization.sub_group_size (now {sub_group_size}) "
                          f"for a finer split", stacklevel=2)
        self.device = next((p.device for g in owned_params for p in g), self.host)
        self.split: dict[tuple[int, int], SplitChunk] = {}
        self.masters = MasterWeights(owned_params, force_copy=force_copy, device=self.host,
                                     allocate=self.allocates_masters and not self.device_prefix)
        if self.device_prefix and self.masters.keeps_copy:
            self._place_masters()
        self._chunk_of = {id(m): (gi, ci) for gi, g in enumerate(self.masters.masters) for ci, m in enumerate(g)}
        # Where the parameters are decides every CUDA-only branch (pinning, streams), never
        # whether the host has a GPU: a CPU run takes none of them.
        self.on_accelerator = any(p.device.type == "cuda" for g in owned_params for p in g)
        self.write_back = WriteBack(self.on_accelerator, max_sub_group_numel(self.plan))
        self.failed: BaseException | None = None

    def _place_masters(self) -> None:
        """Master copies with a device part ([Note: partial offload]): on the device for chunks
        wholly there, split for the boundary chunk, as the backend keeps them for the others."""
        for (gi, ci), boundary in self.device_prefix.items():
            param = self.masters.owned_params[gi][ci].detach()
            if boundary == param.numel():
                self.masters.masters[gi][ci] = param.to(device=self.device, dtype=torch.float32, copy=True)
                continue
            split = self.split.setdefault((gi, ci), SplitChunk(boundary))
            split.on_device["master"] = param.narrow(0, 0, boundary).to(dtype=torch.float32, copy=True)
            rest = param.narrow(0, boundary, param.numel() - boundary)
            split.offloaded["master"] = (rest.to(device=self.host, dtype=torch.float32, copy=True)
                                         if self.allocates_masters else unallocated_fp32(rest.numel(), self.host))
        if self.allocates_masters:   # the wholly offloaded chunks: host copies, as without a ratio
            for gi, group in enumerate(self.masters.masters):
                for ci, master in enumerate(group):
                    if (gi, ci) not in self.device_prefix:
                        group[ci] = self.masters.owned_params[gi][ci].detach().to(
                            device=self.host, dtype=torch.float32, copy=True)

    def attach(self, inner: torch.optim.Optimizer, update=None) -> None:
        check_offloadable(inner)
        super().attach(inner, update)
        self.state_keys = state_keys(inner)
        for group in inner.param_groups:
            for master in group["params"]:
                state = inner.state[master]
                if not state:   # eager, torch's layout: step counter + zeroed moments
                    state["step"] = new_step_counter(master)
                    for key in self.state_keys:
                        state[key] = self._placed_state(key, master)
        self._group_of = {}
        for gi, group in enumerate(inner.param_groups):
            for master in group["params"]:
                self._group_of[id(master)] = gi

    def _new_state(self, master: torch.Tensor) -> torch.Tensor:
        """A zeroed state tensor of an offloaded chunk, where this backend keeps it."""
        return torch.zeros_like(master)

    def _placed_state(self, key: str, master: torch.Tensor) -> torch.Tensor:
        """The zeroed ``key`` state of ``master`` in torch's layout ([Note: partial offload])."""
        chunk = self._chunk_of[id(master)]
        boundary = self.device_prefix.get(chunk, 0)
        if boundary == 0:
            return self._new_state(master)
        if boundary == master.numel():
            return torch.zeros(boundary, dtype=torch.float32, device=self.device)
        split = self.split.setdefault(chunk, SplitChunk(boundary))
        split.on_device[key] = torch.zeros(boundary, dtype=torch.float32, device=self.device)
        rest = unallocated_fp32(master.numel() - boundary, self.host)
        split.offloaded[key] = self._new_state(rest)
        return unallocated_fp32(master.numel(), self.host)   # shape only: the values are in ``split``

    def _side(self, kind: str, group: int, chunk: int, on_device: bool) -> tuple[torch.Tensor, int]:
        """The tensor holding ``kind`` of chunk (group, chunk) on the device side or the offloaded
        side, and the chunk element its first element is ([Note: partial offload])."""
        split = self.split.get((group, chunk))
        if split is None or (kind == "master" and not self.masters.keeps_copy):
            return self._resident_tensor(kind, group, chunk), 0
        if on_device:
            return split.on_device[kind], 0
        return split.offloaded[kind], split.boundary

    def _views(self, sub_group: SubGroup, on_device: bool) -> SubGroupViews:
        """``sub_group``'s masters and states in place, on the device side or the resident
        offloaded side ([Note: partial offload])."""
        def views(kind: str) -> list[torch.Tensor]:
            out = []
            for s in sub_group.slices:
                tensor, base = self._side(kind, s.group, s.chunk, on_device)
                out.append(tensor.narrow(0, s.start - base, s.length))
            return out
        return SubGroupViews(views("master"), {key: views(key) for key in self.state_keys})

    def split_parts(self) -> list[torch.Tensor]:
        return [t for split in self.split.values() for side in (split.on_device, split.offloaded)
                for t in side.values()]

    def _offloaded_tensors(self, kinds: tuple[str, ...]) -> list[torch.Tensor]:
        """The resident tensors holding ``kinds`` of the offloaded parts of all chunks."""
        out = []
        for gi, group in enumerate(self.masters.masters):
            for ci, master in enumerate(group):
                if self.device_prefix.get((gi, ci), 0) < master.numel():
                    out += [self._side(kind, gi, ci, False)[0] for kind in kinds]
        return out

    # ---- streamed access, split at the device prefix ([Note: partial offload]) ------------
    def read_state(self, kind: str, group: int, chunk: int, start: int, length: int) -> Iterator[torch.Tensor]:
        boundary, end = self.device_prefix.get((group, chunk), 0), start + length
        if start < boundary:
            tensor, base = self._side(kind, group, chunk, True)
            yield tensor.narrow(0, start - base, min(end, boundary) - start)
        if end > boundary:
            lo = max(start, boundary)
            yield from self._read_offloaded(kind, group, chunk, lo, end - lo)

    def write_state(self, kind: str, group: int, chunk: int, start: int, length: int,
                    fill: Callable[[int, torch.Tensor], None]) -> None:
        boundary, end = self.device_prefix.get((group, chunk), 0), start + length
        if start < boundary:
            tensor, base = self._side(kind, group, chunk, True)
            part = tensor.narrow(0, start - base, min(end, boundary) - start)
            fill(0, part)
            if kind == "master":
                self._master_to_param(group, chunk, start, part)
        if end > boundary:
            lo = max(start, boundary)
            self._write_offloaded(kind, group, chunk, lo, end - lo,
                                  lambda offset, part: fill(lo - start + offset, part))

    def _read_offloaded(self, kind: str, group: int, chunk: int, start: int, length: int) -> Iterator[torch.Tensor]:
        """``read_state`` of a range wholly in the offloaded part (resident here: one view)."""
        tensor, base = self._side(kind, group, chunk, False)
        yield tensor.narrow(0, start - base, length)

    def _write_offloaded(self, kind: str, group: int, chunk: int, start: int, length: int,
                         fill: Callable[[int, torch.Tensor], None]) -> None:
        tensor, base = self._side(kind, group, chunk, False)
        part = tensor.narrow(0, start - base, length)
        fill(0, part)
        if kind == "master":
            self._master_to_param(group, chunk, start, part)

    # ---- storage (subclasses) ------------------------------------------------------------
    def _prefetch(self, sub_group: SubGroup) -> None:
        """Start making ``sub_group``'s tensors available (no-op when resident)."""

    @abc.abstractmethod
    def _acquire(self, sub_group: SubGroup) -> SubGroupViews:
        """Wait until ``sub_group``'s masters and states are readable and writable on the host."""

    def _release(self, sub_group: SubGroup, copied) -> None:
        """``sub_group`` is updated; ``copied`` completes once its copy-back is done."""

    def _finish(self) -> None:
        """Every release of this step has reached its storage."""

    # ---- the loop ---------------------------------------------------------------------
    def _check_healthy(self) -> None:
        if self.failed is not None:
            raise RuntimeError(f"hf_zero: offloaded optimizer state is unusable after an earlier error "
                               f"({self.failed}); restart from the last checkpoint") from self.failed

    @torch.no_grad()
    def step(self, grads: list[list[torch.Tensor]], coefficient: torch.Tensor,
             overflow: Optional[torch.Tensor] = None) -> None:
        self._check_healthy()
        try:
            self._step(grads, coefficient)
        except BaseException as err:
            self.failed = err
            raise

    def _step(self, grads: list[list[torch.Tensor]], coefficient: torch.Tensor) -> None:
        coefficient = coefficient.to(self.host)    # one device->host read per step (CUDA)
        grad_pass = GradPass.for_step(coefficient, self.fold_coefficient)
        groups = self.inner.param_groups
        step = {gi: float(self.inner.state[g["params"][0]]["step"]) + 1 for gi, g in enumerate(groups)
                if g["params"]}
        offloaded = self.plan[self.num_on_device:]   # device sub-groups first ([Note: partial offload])
        if offloaded:
            self._prefetch(offloaded[0])             # its read overlaps the device sub-groups' updates
        download = GradDownload(grads, offloaded) if downloads_needed(grads, self.stage_downloads) else None
        if download is not None and offloaded:
            download.start(offloaded[0])
        # One sub-group of host fp32 staging for gradients that need a copy (bf16, device),
        # reused by every sub-group and freed with the step ([Note: folding the coefficient]).
        # (Downloaded slices are host tensors of the gradients' dtype: only non-fp32 ones need it.)
        copied = any(g.dtype != torch.float32 or (download is None and g.device != self.host)
                     for gs in grads for g in gs)
        staging = torch.empty(max_sub_group_numel(offloaded), dtype=torch.float32) if copied else None
        for i, sub_group in enumerate(self.plan):
            on_device = i < self.num_on_device
            if not on_device and i + 1 < len(self.plan):
                self._prefetch(self.plan[i + 1])
                if download is not None:
                    download.start(self.plan[i + 1])   # overlaps i's update ([Note: gradient download])
            views = self._views(sub_group, True) if on_device else self._acquire(sub_group)
            slices = (download.take(sub_group) if download is not None and not on_device else
                      [grads[s.group][s.chunk].narrow(0, s.start, s.length) for s in sub_group.slices])
            self._update(sub_group, views, slices, grad_pass, step,
                         self.device if on_device else self.host, None if on_device else staging)
            copies = []
            for k, s in enumerate(sub_group.slices):
                dst = self.masters.param_target(s.group, s.chunk, s.start, s.length)
                if dst is not None:
                    copies.append((dst, views.masters[k]))
            if on_device:   # beside the parameters: a plain copy, as the 'none' backend does
                for dst, src in copies:
                    dst.copy_(src)
                if copies and self.on_params_done is not None:
                    self.on_params_done([dst for dst, _ in copies])
            else:
                self._release(sub_group, self.write_back.submit(copies, self.on_params_done))
        self._finish()
        if download is not None:
            download.finish()
        self.write_back.wait_all()
        for gi, g in enumerate(groups):
            for master in g["params"]:
                self.inner.state[master]["step"] += 1

    def _update(self, sub_group: SubGroup, views: SubGroupViews, slices: list[torch.Tensor], grad_pass: GradPass,
                step: dict[int, float], where: torch.device, staging: Optional[torch.Tensor]) -> None:
        """Adam(W) over one sub-group, per parameter group present in it, on ``where``."""
        groups = self.inner.param_groups
        by_group: dict[int, list[int]] = {}
        for k, s in enumerate(sub_group.slices):
            by_group.setdefault(self._group_of[id(self.masters.masters[s.group][s.chunk])], []).append(k)
        for gi, ks in by_group.items():
            divisor = grad_pass.divisor_for(runs_fused(groups[gi]))
            grad_slices = [grad_pass.host_grad(slices[k], where, divisor is not None,
                                               None if staging is None else staging.narrow(0, s.offset, s.length))
                           for k, s in ((k, sub_group.slices[k]) for k in ks)]
            adam_update(self.inner, groups[gi], [views.masters[k] for k in ks], grad_slices,
                        {key: [views.states[key][k] for k in ks] for key in self.state_keys}, step[gi],
                        grad_divisor=divisor)

    def close(self) -> None:
        self.write_back.close()

