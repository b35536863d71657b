"""The phases of ``ZeroEngine.__init__``, in the order they must run (engine.py calls them).

1. :func:`check_and_place` (rank-local: config, parameter groups, device, parameter store,
   timers; the ranks agree on the outcome) returns the frozen :class:`BuildContext` every
   later phase reads; then :func:`agree_on_model` (fingerprints; debug checker).
2. :func:`shard_model`: cast, materialise a ``zero_init`` model, lay out the groups, build the
   stage with its services (timers, ZeRO++ collectives, hybrid / hpZ groups, all given to
   constructors), start every rank from rank 0's weights; returns :class:`Sharded`.
3. :func:`build_update`: the offload backend (masters, where the update runs) and the inner
   optimizer over the masters, built from :class:`Sharded`; subscribes the backend's
   master re-read to the stage's shard edits (the one edge that must point back: the
   backend is built from the stage's owned chunks). With ``fused_kernels: "triton"``,
   :func:`fused_update` is the in-memory backend's update strategy (given to ``attach``).
4. :func:`resolve_scheduler`: the schedule over the engine's optimizer.

[Note: explicit wiring]
Each phase takes what it needs and returns what it built; no phase assigns attributes onto
an object another phase built, and no code outside ``stages/`` asks a stage or its groups
what they have with ``hasattr`` / ``getattr`` (``tests/test_wiring.py`` keeps it so). The
order is enforced by data: a phase needs the previous one's result to be called.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
import torch.distributed as dist
from torch import nn

from hf_zero.comm import Collectives, rank_local_step
from hf_zero.config import ConfigError, HfZeroConfig, resolve_batch_sizes
from hf_zero.config.compat import unresolved_autos
from hf_zero.device import collective_device, compute_device_of, uses_cuda
from hf_zero.diagnostics.step_report import StepTimers
from hf_zero.fingerprint import check_same_everywhere
from hf_zero.meta_init import has_meta_parameters
from hf_zero.offload import OptimizerOffload, ParamStore, build_optimizer_offload, build_param_store
from hf_zero.optim.build import bind_tensor_layout, build_optimizer, check_optimizer_is_fresh, rebind_optimizer
from hf_zero.optim.lr_schedules import build_scheduler
from hf_zero.param_groups import ParamGroupSpec, collect_param_groups
from hf_zero.stages import StageServices, ZeroStage, build_groups_and_stage
from hf_zero.topology import build_hpz_collectives, build_hybrid_collectives, hybrid_sharding_problems

if TYPE_CHECKING:
    from hf_zero.optim.fused_step import FusedAdamW


def check_supported(config: HfZeroConfig) -> None:
    """Refuse, before any tensor work, what this build cannot run yet or cannot resolve."""
    problems = unresolved_autos(config)   # first: the checks below read these values
    if problems:
        raise ConfigError(problems)
    zero = config.zero_optimization
    if zero.stage == 3 and (zero.zero_quantized_gradients or zero.zero_quantized_weights):
        problems.append(("zero_optimization.zero_quantized_weights", "not implemented for stage 3 yet"))
    if zero.offload_param.device != "none" and zero.stage != 3:
        problems.append(("zero_optimization.offload_param.device", "parameter offload needs stage 3"))
    if zero.offload_optimizer.device != "none" and zero.stage == 0:
        problems.append(("zero_optimization.offload_optimizer.device", "optimizer offload needs stage 1, 2 or 3"))
    if zero.stage == 0 and (zero.zero_quantized_gradients or zero.zero_quantized_weights):
        problems.append(("zero_optimization.zero_quantized_gradients", "quantized communication needs stage 1 or 2"))
    problems += hybrid_sharding_problems(zero)   # mics_shard_size, zero_hpz_partition_size
    if config.fp16.enabled is True and config.bf16.enabled is True:
        problems.append(("fp16.enabled", "fp16 and bf16 cannot both be enabled"))
    if problems:
        raise ConfigError(problems)


def model_dtype(config: HfZeroConfig) -> torch.dtype:
    if config.bf16.enabled is True:
        return torch.bfloat16
    if config.fp16.enabled is True:
        return torch.float16
    return torch.float32


@dataclass(frozen=True)
class BuildContext:
    """What the rank-local checks decided, built once and read by every later phase: the
    resolved config, where things live, the world's collectives and the phase timers."""

    comm: Collectives
    config: HfZeroConfig
    specs: list[ParamGroupSpec]
    device: torch.device
    dtype: torch.dtype
    param_store: ParamStore
    timers: Optional[StepTimers]   # wall_clock_breakdown; None when off


@dataclass(frozen=True)
class Sharded:
    """What :func:`shard_model` built: the stage, its trainable groups (``stage.groups``),
    the optimizer group of each, and the collectives the stage partitions over."""

    stage: ZeroStage
    flat_groups: list
    group_spec: list[int]
    partition_comm: Collectives   # the world, or the shard group with mics_shard_size


@dataclass(frozen=True)
class Update:
    """What :func:`build_update` built: the offload backend and the inner optimizer."""

    offload: OptimizerOffload
    inner: torch.optim.Optimizer


def check_and_place(comm: Collectives, model: nn.Module, config: HfZeroConfig,
                    optimizer: Optional[torch.optim.Optimizer]) -> BuildContext:
    """Rank-local checks before the first collective, then the ranks agree: a failure on one
    rank is the same error on all (comm.agree_on_failure), never a hang."""
    with rank_local_step(comm, "hf_zero.initialize"):
        config = resolve_batch_sizes(config, comm.world_size)
        check_supported(config)
        if optimizer is not None:
            check_optimizer_is_fresh(optimizer)
        specs = collect_param_groups(model, optimizer)
        if not any(spec.params for spec in specs):
            raise ValueError("the model has no trainable parameters")
        device = compute_device_of(model)   # [Note: device selection] in device.py
        if uses_cuda(device):
            # CUDA-only branch: NCCL's collectives (the agreement below included), the RNG a
            # checkpoint saves and torch's default allocations follow the current device.
            torch.cuda.set_device(device)
        dtype = model_dtype(config)
        # Where stage-3 shards live (offload_param; 'none' below stage 3, refused above);
        # an NVMe path is checked here, before any work.
        param_store = build_param_store(config.zero_optimization, model, dtype, comm.world_size, comm.rank, device)
    timers = StepTimers(device) if config.wall_clock_breakdown else None
    return BuildContext(comm, config, specs, device, dtype, param_store, timers)


def agree_on_model(comm: Collectives, model: nn.Module, config: HfZeroConfig) -> None:
    """Every rank built the same model and config; debug mode checks every later collective."""
    check_same_everywhere(comm, model, config)
    if config.debug_collectives and comm.active:
        from hf_zero.diagnostics.divergence import CollectiveChecker

        comm.checker = CollectiveChecker(comm.group, comm.rank, comm.world_size, config.debug_collectives_timeout)


def stage_services(comm: Collectives, config: HfZeroConfig, timers: Optional[StepTimers]) -> StageServices:
    zero = config.zero_optimization
    if not (zero.zero_quantized_gradients or zero.zero_quantized_weights):
        return StageServices(timers=timers)
    from hf_zero.quantized_comm import QuantizedCollectives

    quantized = QuantizedCollectives(comm)
    return StageServices(timers=timers, quantized_gradients=quantized if zero.zero_quantized_gradients else None,
                         quantized_weights=quantized if zero.zero_quantized_weights else None)


def shard_model(ctx: BuildContext, model: nn.Module) -> Sharded:
    """Shard ``model`` in place: the stage, its groups and the collectives it partitions over."""
    zero = ctx.config.zero_optimization
    # check_supported refused unresolved "auto" values: these are ints from here on.
    stage_number = cast(int, zero.stage)
    reduce_bucket, allgather_bucket = cast(int, zero.reduce_bucket_size), cast(int, zero.allgather_bucket_size)
    if ctx.dtype != torch.float32:
        model.to(ctx.dtype)
    source = meta_source(ctx, model, stage_number) if has_meta_parameters(model) else None
    # mics_shard_size: the stage partitions over its shard group; zero_hpz_partition_size:
    # stage-3 groups keep a secondary partition over k ranks (hf_zero/topology.py).
    partition_comm = build_hybrid_collectives(ctx.comm, zero.mics_shard_size) or ctx.comm
    secondary_comm = build_hpz_collectives(ctx.comm, zero.zero_hpz_partition_size if stage_number == 3 else 1)
    stage, flat_groups, group_spec = build_groups_and_stage(
        stage_number, model, ctx.specs, partition_comm,
        bucket_numel=max(1, reduce_bucket),   # 0: per parameter
        overlap_comm=zero.overlap_comm, allgather_bucket_numel=max(1, allgather_bucket),
        stage3_options=dict(prefetch_numel=zero.stage3_prefetch_bucket_size,
                            max_live_numel=zero.stage3_max_live_parameters,
                            persistence_threshold=zero.stage3_param_persistence_threshold,
                            persist_frozen=zero.stage3_persist_frozen_params,
                            source=source, store=ctx.param_store, secondary_comm=secondary_comm),
        services=stage_services(ctx.comm, ctx.config, ctx.timers))
    if source is not None:   # stage 3 read its slices while building: a failed read is every rank's error
        source.agree_on_reads(ctx.comm)
    stage.watch_outputs(model)
    broadcast_model(ctx.comm, model, stage, flat_groups)
    return Sharded(stage, flat_groups, group_spec, partition_comm)


def meta_source(ctx: BuildContext, model: nn.Module, stage: int):
    """Values for a model built under ``zero_init`` (see meta_init.py's note): stage 3
    reads them shard by shard; stages 0-2 materialise every parameter whole here.
    ``ctx``: anything with the context's ``comm`` and ``device``."""
    from hf_zero.stages.stage3_units import find_unit_modules
    from hf_zero.meta_init import ParameterSource, pending_seed, set_parameter_tensor

    # The seed crosses ranks on a device the group's backend serves (NCCL: this rank's
    # GPU, gloo: the host); a host tensor on an NCCL-only group raises.
    where = (collective_device(dist.get_backend(ctx.comm.group), ctx.device) if ctx.comm.active
             else torch.device("cpu"))
    seed = torch.tensor([pending_seed()], dtype=torch.int64, device=where)
    ctx.comm.broadcast(seed)   # rank 0's seed: every rank computes identical values
    source = ParameterSource(model, find_unit_modules(model), int(seed.item()), ctx.device)
    source.materialise_buffers()
    if stage == 3:
        return source
    with torch.no_grad():
        for name, p in model.named_parameters():
            set_parameter_tensor(p, source.full(name, p))
    source.close()
    source.agree_on_reads(ctx.comm)   # a failed read is every rank's error (meta_init.py's note)
    return None


def broadcast_model(comm: Collectives, model: nn.Module, stage: ZeroStage, flat_groups: list) -> None:
    """Start every rank from rank 0's weights and buffers, as DDP does."""
    if not comm.active:
        return
    grouped = {id(p) for g in stage.parameter_groups() for p in g.params}
    with torch.no_grad():
        for g in flat_groups:
            for tensor in g.broadcast_tensors():
                comm.broadcast(tensor)
        for p in model.parameters():
            if id(p) not in grouped:
                comm.broadcast(p.data)
        for b in model.buffers():
            comm.broadcast(b)


def build_update(ctx: BuildContext, sharded: Sharded, optimizer: Optional[torch.optim.Optimizer]) -> Update:
    """The offload backend (none / cpu / nvme: where masters and optimizer states live and the
    update runs) and the inner optimizer over its masters. Setup is rank-local (NVMe: the swap
    directory's checks), so the ranks agree on its outcome."""
    zero, stage = ctx.config.zero_optimization, sharded.stage
    with rank_local_step(ctx.comm, "hf_zero.initialize (optimizer offload setup)"):
        # Shards on NVMe: pages the optimizer read (setup) or wrote (copy-back) are dropped per
        # sub-group, so no pass over the model holds all shards resident.
        on_params_done = ctx.param_store.drop_pages if ctx.param_store.offloads else None
        # Quantized weight all-gathers overwrite the owner's chunk too: keep exact fp32 masters apart.
        offload = build_optimizer_offload(zero, stage.owned_params(), ctx.comm.rank,
                                          force_copy=zero.zero_quantized_weights, on_params_done=on_params_done)
        # GatheredParameters(modifier_rank=...) edits of stage-3 shards reach the masters
        # (edited ranges only); stages 0-2 never report an edit.
        stage.subscribe_shard_edits(MasterReload(offload))
        # Each optimizer group steps the master chunks of all its parameter groups (several at
        # stage 3, one per unit; none for a group emptied by freezing).
        master_groups: list[list[torch.Tensor]] = [[] for _ in ctx.specs]
        for spec_index, masters in zip(sharded.group_spec, offload.masters.masters):
            master_groups[spec_index].extend(masters)
        if optimizer is None:
            inner = build_optimizer(ctx.config.optimizer, master_groups, [s.options for s in ctx.specs])
        else:
            rebind_optimizer(optimizer, master_groups)
            inner = optimizer
        bind_tensor_layout(inner, stage, sharded.flat_groups, offload.masters.masters)   # Lamb, Muon
        offload.attach(inner, fused_update(ctx.config.fused_kernels, inner, offload))
    return Update(offload, inner)


@dataclass(frozen=True)
class MasterReload:
    """Shard ranges of trainable group ``group_index`` were edited outside the optimizer
    (GatheredParameters with modifier_rank): re-read the master elements there whose
    parameter value no longer equals the master rounded to the parameter's dtype. Every
    other master element stays bit-identical (re-reading it from a bf16 parameter would drop
    its low bits)."""

    offload: OptimizerOffload

    def __call__(self, group_index: int, ranges: list[tuple[int, int, int]]) -> None:
        masters = self.offload.masters
        if not masters.keeps_copy:
            return   # the parameter chunk is the master itself
        chunks = masters.owned_params[group_index]

        for chunk, start, length in ranges:
            self.offload.write_state("master", group_index, chunk, start, length,
                                     partial(_keep_unedited, chunks[chunk], start))


def _keep_unedited(param_chunk: torch.Tensor, start: int, offset: int, part: torch.Tensor) -> None:
    """Master ``part`` (elements ``start + offset`` on of ``param_chunk``'s master) takes the
    parameter's value only where the parameter no longer equals the master in its dtype."""
    edited = param_chunk.narrow(0, start + offset, part.numel())
    part.copy_(torch.where(part.to(edited.dtype) == edited, part, edited.to(part.dtype)))


def fused_update(fused_kernels: str, inner: torch.optim.Optimizer, offload: Any) -> Optional["FusedAdamW"]:
    """hf_zero_kernels' one-pass AdamW as ``offload``'s update strategy, only when asked for
    (``fused_kernels: "triton"``). "auto" keeps the inner torch optimizer (fused AdamW on CUDA
    and CPU) until the Triton kernels have passed ``make gpu-check`` on a device
    (docs/kernels.md, docs/gpu.md)."""
    from hf_zero.optim.fused_step import FusedAdamW, fused_supported

    if fused_kernels != "triton":
        return None
    if not fused_supported(inner):
        raise ValueError(f"fused_kernels='triton' needs torch.optim.AdamW without amsgrad/maximize, "
                         f"got {type(inner).__name__}")
    if not offload.updates_on_device:
        raise ValueError("fused_kernels='triton' runs the update on the device; offload_optimizer runs it "
                         "on the CPU (use 'auto' or 'off')")
    return FusedAdamW(inner, offload.masters, backend="triton")


def resolve_scheduler(lr_scheduler: Any, config: HfZeroConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The user's scheduler, one built from a callable taking the optimizer, or the config's."""
    if lr_scheduler is None and config.scheduler is not None:
        return build_scheduler(config.scheduler, optimizer)
    if callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
        return lr_scheduler(optimizer)
    return lr_scheduler
