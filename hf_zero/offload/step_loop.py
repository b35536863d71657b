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
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from hf_zero.offload.grad_download import GradDownload, downloads_needed
from hf_zero.offload.cpu_adam import adam_update, check_offloadable, new_step_counter, runs_fused, state_keys
from hf_zero.offload.grad_pass import GradPass
from hf_zero.offload.protocol import OptimizerOffload
from hf_zero.offload.subgroups import SubGroup, max_sub_group_numel, plan_sub_groups
from hf_zero.offload.write_back import WriteBack
from hf_zero.optim.master_weights import MasterWeights


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
                 on_params_done: Optional[Callable[[list[torch.Tensor]], None]] = None):
        self.on_params_done = on_params_done
        self.masters = MasterWeights(owned_params, force_copy=force_copy, device=self.host,
                                     allocate=self.allocates_masters)
        self.plan: list[SubGroup] = plan_sub_groups([[m.numel() for m in g] for g in self.masters.masters],
                                                    sub_group_size)
        # Where the parameters are decides every CUDA-only branch (pinning, streams), never
        # whether the host has a GPU: a CPU run takes none of them.
        self.on_accelerator = any(p.device.type == "cuda" for g in owned_params for p in g)
        self.write_back = WriteBack(self.on_accelerator, max_sub_group_numel(self.plan))
        self.failed: BaseException | None = None

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
                        state[key] = self._new_state(master)
        self._group_of = {}
        for gi, group in enumerate(inner.param_groups):
            for master in group["params"]:
                self._group_of[id(master)] = gi

    def _new_state(self, master: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(master)

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
        masters = self.masters
        coefficient = coefficient.to(self.host)    # one device->host read per step (CUDA)
        grad_pass = GradPass.for_step(coefficient, self.fold_coefficient)
        groups = self.inner.param_groups
        step = {gi: float(self.inner.state[g["params"][0]]["step"]) + 1 for gi, g in enumerate(groups)
                if g["params"]}
        if self.plan:
            self._prefetch(self.plan[0])
        download = GradDownload(grads, self.plan) if downloads_needed(grads, self.stage_downloads) else None
        if download is not None and self.plan:
            download.start(self.plan[0])
        # One sub-group of host fp32 staging for gradients that need a copy (bf16, device),
        # reused by every sub-group and freed with the step ([Note: folding the coefficient]).
        # (Downloaded slices are host tensors of the gradients' dtype: only non-fp32 ones need it.)
        copied = any(g.dtype != torch.float32 or (download is None and g.device != self.host)
                     for gs in grads for g in gs)
        staging = torch.empty(max_sub_group_numel(self.plan), dtype=torch.float32) if copied else None
        for i, sub_group in enumerate(self.plan):
            if i + 1 < len(self.plan):
                self._prefetch(self.plan[i + 1])
                if download is not None:
                    download.start(self.plan[i + 1])   # overlaps i's update ([Note: gradient download])
            views = self._acquire(sub_group)
            slices = (download.take(sub_group) if download is not None else
                      [grads[s.group][s.chunk].narrow(0, s.start, s.length) for s in sub_group.slices])
            by_group: dict[int, list[int]] = {}
            for k, s in enumerate(sub_group.slices):
                by_group.setdefault(self._group_of[id(masters.masters[s.group][s.chunk])], []).append(k)
            for gi, ks in by_group.items():
                divisor = grad_pass.divisor_for(runs_fused(groups[gi]))
                grad_slices = [grad_pass.host_grad(slices[k], self.host, divisor is not None,
                                                   None if staging is None else staging.narrow(0, s.offset, s.length))
                               for k, s in ((k, sub_group.slices[k]) for k in ks)]
                adam_update(self.inner, groups[gi], [views.masters[k] for k in ks], grad_slices,
                            {key: [views.states[key][k] for k in ks] for key in self.state_keys}, step[gi],
                            grad_divisor=divisor)
            copies = []
            for k, s in enumerate(sub_group.slices):
                dst = masters.param_target(s.group, s.chunk, s.start, s.length)
                if dst is not None:
                    copies.append((dst, views.masters[k]))
            self._release(sub_group, self.write_back.submit(copies, self.on_params_done))
        self._finish()
        if download is not None:
            download.finish()
        self.write_back.wait_all()
        for gi, g in enumerate(groups):
            for master in g["params"]:
                self.inner.state[master]["step"] += 1

    def close(self) -> None:
        self.write_back.close()

