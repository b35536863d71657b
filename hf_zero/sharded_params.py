"""Stage-3 parameter storage: at rest a rank holds only its chunk of every bucket.

Same layout as ``FlatParamGroup`` (partition.py's [Note: bucket-interleaved ownership]),
but the full flat buffer exists only between ``gather()`` and ``release()``; at rest each
``param.data`` is an empty tensor and ``param.ds_shape`` / ``param.ds_numel`` give the true
shape (the attribute names peft and other DeepSpeed-aware code read).

A gather is split in two so that stage 3 can prefetch: ``start_gather()`` gives the
full buffer its storage back and launches the bucket all-gathers asynchronously, ``wait()``
completes them and points every ``param.data`` at its view. No collective is issued
anywhere else.

[Note: freeing gathered storage in place]
Modules save views of their weights for backward (``nn.Linear`` saves ``weight.t()``,
MoE experts save ``weight[e]``): tensors of their own that share the gathered storage.
Pointing ``param.data`` elsewhere would not free that storage; it would stay allocated
until the block's backward, and the backward gather would allocate a second copy. So each
group owns one ``full`` tensor for its whole life: ``release()`` frees its *storage*
(``untyped_storage().resize_(0)``), which frees the bytes under every saved view too, and
the next gather resizes the same storage back and all-gathers into it, so the saved views
read the refilled values when backward uses them (FSDP2 does the same). The release rule
(stages/stage3.py) guarantees a unit is gathered again before any of its saved views is
read. Each gather records the shard version it was made from; a gather of a unit still
holding values from an older shard version raises instead of reusing them.

Where the shard itself lives (accelerator, host memory or a mapped NVMe file) is the
``ParamStore``'s choice (offload/param_store.py's [Note: parameter offload]); the gather
copies it into the full buffer and then lets the store drop its pages.
"""

from __future__ import annotations

import enum
from typing import Optional

import torch
from torch import nn

from hf_zero.comm import Collectives
from hf_zero.flat_buffer import shard_chunks, views_by_param
from hf_zero.partition import BucketPlan, plan_buckets, shard_numel, total_numel
from hf_zero.meta_init import set_parameter_tensor
from hf_zero.offload.param_store import ParamStore


def sharded_group_of(param: torch.Tensor) -> Optional["ShardedParamGroup"]:
    """The stage-3 group holding ``param``'s shard (GatheredParameters, export); None for a
    parameter no stage-3 group shards. The one reader of the tag the group puts on it."""
    return getattr(param, "_hf_zero_group", None)


class GatherState(enum.Enum):
    RELEASED = "released"     # only ``shard`` is held; param.data is empty
    GATHERING = "gathering"   # ``full`` allocated, all-gathers in flight; param.data still empty
    GATHERED = "gathered"     # ``full`` complete; param.data are views of it


class ShardedParamGroup:
    params: list[nn.Parameter]
    names: list[str]
    plans: list[BucketPlan]
    shard: torch.Tensor             # 1D, model dtype: this rank's chunk of every bucket, in plan order
    full: torch.Tensor              # 1D, model dtype, padded; its storage is empty while RELEASED
    state: GatherState
    shard_version: int              # bumped whenever ``shard`` changes (optimizer step, edits)

    def __init__(self, params: list[nn.Parameter], names: list[str], bucket_numel: int, comm: Collectives,
                 source=None, store: Optional[ParamStore] = None, keep_in_memory: bool = False,
                 secondary_comm: Optional[Collectives] = None):
        """``source``: a zero_init.ParameterSource for meta-built parameters (values are read
        slice by slice from it instead of from ``param.data``). ``store``: where the shard
        lives (default: with the parameters); ``keep_in_memory``: never in a file (the
        persistent set). ``secondary_comm``: the group of k ranks of ZeRO++ hpZ (None: off)."""
        world, rank = comm.world_size, comm.rank
        self.params, self.names, self.rank, self.comm = params, names, rank, comm
        self.on_shard_modified: list = []   # callback(group, ranges): the stage tells its subscribers
        self.plans = plan_buckets([p.numel() for p in params], bucket_numel, world)
        dtype = params[0].dtype
        device = source.device if source is not None else params[0].device
        self._device = device   # where gathered parameters, gradients and buckets live
        self.storage = (store or ParamStore()).allocate(shard_numel(self.plans), dtype, device, keep_in_memory)
        self.shard = self.storage.tensor
        self._shard_chunks = shard_chunks(self.plans, self.shard)
        self._shapes = [p.shape for p in params]
        self.full_numel = total_numel(self.plans)
        # Copy each parameter's slice straight into the shard: no full-size staging buffer,
        # so sharding a unit never holds more than the unit itself twice.
        for plan, chunk in zip(self.plans, self._shard_chunks):
            chunk.zero_()
            start, length = plan.shard(rank)
            for index, offset in zip(plan.param_indices, plan.param_offsets):
                p = params[index]
                lo, hi = max(offset, start), min(offset + p.numel(), start + length)
                if lo >= hi:
                    continue
                target = chunk.narrow(0, lo - start, hi - lo)
                if source is not None:
                    source.read_into(names[index], p, lo - offset, target)
                else:
                    target.copy_(p.detach().reshape(-1).narrow(0, lo - offset, hi - lo))
        for p in params:   # attributes torch does not declare: DeepSpeed's names (peft reads them) and ours
            setattr(p, "ds_shape", tuple(p.shape))
            setattr(p, "ds_numel", p.numel())
            setattr(p, "_hf_zero_group", self)   # lets GatheredParameters find what to gather
        self.storage.evict()
        self.full = torch.empty(self.full_numel, dtype=dtype, device=device)
        self._works: list = []
        self._empty = torch.empty(0, dtype=dtype, device=device)
        # ZeRO++ hpZ ([Note: hpZ secondary partition] in docs/design.md; topology.build_hpz_collectives).
        self.secondary_comm = secondary_comm
        self._secondary: Optional[torch.Tensor] = None
        self._secondary_version = -1
        self.shard_version = 0
        # Shard version the gathered values were made from; -1: ``full`` holds none yet (the
        # release below must not keep an hpZ secondary copy of its uninitialised bytes).
        self._gathered_version = -1
        self.state = GatherState.GATHERED
        self.release()

    @property
    def dtype(self) -> torch.dtype:
        return self.shard.dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def full_bytes(self) -> int:
        return self.full_numel * self.shard.element_size()

    def storage_tensors(self) -> list[torch.Tensor]:
        """Resident storage (a shard mapped from a swap file is reported by the store instead)."""
        shard = [] if self.storage.offloaded else [self.shard]
        return shard + ([self.full] if self.gathered else []) + self.secondary_tensors()

    def broadcast_tensors(self) -> list[torch.Tensor]:
        return []   # built from parameters already broadcast before sharding

    @property
    def gathered(self) -> bool:
        return self.state is not GatherState.RELEASED

    def shard_chunks(self) -> list[torch.Tensor]:
        """Per bucket: this rank's chunk (views of ``shard``), what the optimizer updates."""
        return self._shard_chunks

    @property
    def stale(self) -> bool:
        """Gathered values made from an older shard than the current one."""
        return self.gathered and self._gathered_version != self.shard_version

    def mark_shard_modified(self) -> None:
        """The shard changed (optimizer step, load): gathered values, if any, are now stale."""
        self.shard_version += 1

    def start_gather(self) -> None:
        """Launch the all-gathers of the full parameters (asynchronously); no-op unless released."""
        if self.state is not GatherState.RELEASED:
            if self.stale:
                raise RuntimeError(
                    f"hf_zero stage 3: parameters {self.names[:3]}... are still gathered from before their shard "
                    "changed (an optimizer step or load while they were gathered); release them first "
                    "(this is a bug in hf_zero's pass bookkeeping, please report it)")
            return
        # The same storage saved views point at ([Note: freeing gathered storage in place]);
        # [Note: stage-3 copy-in on CUDA] (offload/param_store.py): with a host shard on CUDA
        # it is regrown from the all-gather stream's pool; elsewhere a plain resize.
        self.storage.copy_in.regrow(self.full, self.full_bytes, from_host=self.shard.device != self.device)
        if self._secondary_current():   # hpZ: gather inside the group of k from the secondary copy
            self._works = self._all_gather_secondary(self.full)
        else:
            self._works = self._all_gather_into(self.full)
            self.storage.evict()   # the shard was copied into ``full``
        self._gathered_version = self.shard_version
        self.state = GatherState.GATHERING

    def wait(self) -> None:
        """Complete a started gather and point every ``param.data`` at its view."""
        if self.state is not GatherState.GATHERING:
            return
        for work in self._works:
            work.wait()
        self._works = []
        self.storage.copy_in.consumed(self.full)
        for view, p in zip(views_by_param(self.plans, self._shapes, self.full), self.params):
            p.data = view
        self.state = GatherState.GATHERED

    def gather(self, comm: Optional[Collectives] = None) -> None:
        """All-gather the full parameters and point every ``param.data`` at them."""
        self.start_gather()
        self.wait()

    def refresh(self) -> None:
        """Re-gather in place after the optimizer updated the shard (kept-gathered groups)."""
        if self.state is GatherState.RELEASED:
            return
        self.wait()
        for work in self._all_gather_into(self.full):
            work.wait()
        self.storage.copy_in.consumed(self.full)
        self.storage.evict()
        self._gathered_version = self.shard_version

    def _all_gather_into(self, full: torch.Tensor) -> list:
        mine = [full.narrow(0, plan.shard(self.rank)[0], plan.shard(self.rank)[1]) for plan in self.plans]

        def issue() -> list:
            return [self.comm.all_gather(full.narrow(0, plan.start, plan.padded_numel), m, async_op=True)
                    for plan, m in zip(self.plans, mine)]
        return self.storage.copy_in.run(list(zip(mine, self._shard_chunks)), issue)

    def write_back_full(self, edited: Optional[list[nn.Parameter]] = None) -> None:
        """Copy the gathered values of ``edited`` (default: every parameter) into this rank's
        shard and tell ``on_shard_modified`` callbacks which shard ranges changed, as
        (chunk index, start, length) in the chunks of ``shard_chunks()``; the rest of the
        shard, and whatever was derived from it (fp32 masters), stays as it was."""
        self.wait()
        wanted = None if edited is None else {id(p) for p in edited}
        ranges = []
        for chunk_index, (plan, chunk) in enumerate(zip(self.plans, self._shard_chunks)):
            start, length = plan.shard(self.rank)
            for index, offset in zip(plan.param_indices, plan.param_offsets):
                if wanted is not None and id(self.params[index]) not in wanted:
                    continue
                lo, hi = max(offset, start), min(offset + self.params[index].numel(), start + length)
                if lo < hi:
                    chunk.narrow(0, lo - start, hi - lo).copy_(self.full.narrow(0, lo, hi - lo))
                    ranges.append((chunk_index, lo - start, hi - lo))
        self.storage.evict()
        self.shard_version += 1
        self._gathered_version = self.shard_version   # the gathered values are what the shard now holds
        for callback in self.on_shard_modified:
            callback(self, ranges)

    def release(self) -> None:
        if self.state is GatherState.RELEASED:
            return
        self.wait()   # never free a buffer an all-gather is still writing into
        if self.secondary_comm is not None and self._gathered_version == self.shard_version:
            self._keep_secondary()
        for p in self.params:
            set_parameter_tensor(p, self._empty)
        # Free the bytes, not just our reference: views autograd saved share this storage
        # ([Note: freeing gathered storage in place]).
        self.full.untyped_storage().resize_(0)
        self.state = GatherState.RELEASED

    # [Note: hpZ secondary partition] ZeRO++ hpZ: before a gathered unit is freed, each rank
    # keeps piece i (its index in its group of k) of every bucket; a later gather of the same
    # shard version (backward, or the next micro-step's forward) all-gathers those pieces
    # inside the group instead of the primary chunks across the world. A step or a load bumps
    # the shard version, so the first forward after it gathers from the primary partition.
    def _secondary_pieces(self) -> list[int]:
        assert self.secondary_comm is not None   # hpZ paths only (enable_hpz set it)
        return [plan.padded_numel // self.secondary_comm.world_size for plan in self.plans]

    def _secondary_current(self) -> bool:
        return self.secondary_comm is not None and self._secondary_version == self.shard_version

    def _keep_secondary(self) -> None:
        assert self.secondary_comm is not None   # release() calls this under hpZ only
        pieces, index = self._secondary_pieces(), self.secondary_comm.rank
        if self._secondary is None:
            self._secondary = torch.empty(sum(pieces), dtype=self.full.dtype, device=self.full.device)
        offset = 0
        for plan, n in zip(self.plans, pieces):
            self._secondary.narrow(0, offset, n).copy_(self.full.narrow(0, plan.start + index * n, n))
            offset += n
        self._secondary_version = self.shard_version

    def _all_gather_secondary(self, full: torch.Tensor) -> list:
        # _secondary_current() held: hpZ is on and _keep_secondary filled the copy for this version
        assert self.secondary_comm is not None and self._secondary is not None
        works, offset = [], 0
        for plan, n in zip(self.plans, self._secondary_pieces()):
            works.append(self.secondary_comm.all_gather(full.narrow(0, plan.start, plan.padded_numel),
                                                        self._secondary.narrow(0, offset, n), async_op=True))
            offset += n
        return works

    def secondary_tensors(self) -> list[torch.Tensor]:
        """hpZ's secondary copy, for memory accounting."""
        return [] if self._secondary is None else [self._secondary]
