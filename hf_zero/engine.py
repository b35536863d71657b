"""The object users and integrations hold: ``hf_zero.initialize(model, config)``.

The model is sharded in place (``engine.module is model``): its trainable parameters become
views into flat buffers, gradient reduction hangs off autograd hooks, and ``model.no_sync``
/ ``model.zero_grad`` are routed to the engine, so both the DeepSpeed-style loop
(``engine.backward`` / ``engine.step``) and the plain torch loop (``loss.backward()`` /
``optimizer.step()``) used by accelerate and the HF Trainer train identically.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from hf_zero.accounting import bytes_by_category
from hf_zero.comm import Collectives, rank_local_step
from hf_zero.config import ConfigError, HfZeroConfig, load_config, resolve_batch_sizes
from hf_zero.config.compat import unresolved_autos
from hf_zero.device import collective_device, compute_device_of, uses_cuda
from hf_zero.fingerprint import check_same_everywhere
from hf_zero.diagnostics.step_report import StepTimers, format_report, peak_rss_bytes, timed
from hf_zero.optim.build import bind_tensor_layout, build_optimizer, check_optimizer_is_fresh, rebind_optimizer
from hf_zero.optim.loss_scaler import build_loss_scaler
from hf_zero.optim.lr_schedules import build_scheduler
from hf_zero.optim.master_weights import MasterWeights
from hf_zero.optim.zero_optimizer import ZeroOptimizer
from hf_zero.offload import build_optimizer_offload, build_param_store
from hf_zero.param_groups import collect_param_groups
from hf_zero.stages import build_groups_and_stage
from hf_zero.topology import build_hybrid_collectives, enable_hpz, hybrid_sharding_problems
from hf_zero.meta_init import has_meta_parameters
from hf_zero.checkpoint.model_hooks import install_save_hooks

logger = logging.getLogger(__name__)


def _check_supported(config: HfZeroConfig) -> None:
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


def _model_dtype(config: HfZeroConfig) -> torch.dtype:
    if config.bf16.enabled is True:
        return torch.bfloat16
    if config.fp16.enabled is True:
        return torch.float16
    return torch.float32


class ZeroEngine:
    """Holds the sharded model, its optimizer and schedule; see module docstring."""

    def __init__(self, model: nn.Module, config: HfZeroConfig, optimizer: Optional[torch.optim.Optimizer],
                 lr_scheduler: Any, group: Optional[dist.ProcessGroup]):
        self.comm = Collectives(group)
        # Rank-local checks come before the first collective, then the ranks agree: a failure
        # on one rank is the same error on all (comm.agree_on_failure), never a hang.
        with rank_local_step(self.comm, "hf_zero.initialize"):
            self.config = resolve_batch_sizes(config, self.comm.world_size)
            _check_supported(self.config)
            if optimizer is not None:
                check_optimizer_is_fresh(optimizer)
            specs = collect_param_groups(model, optimizer)
            if not any(spec.params for spec in specs):
                raise ValueError("the model has no trainable parameters")
            self.device = compute_device_of(model)   # [Note: device selection] in device.py
            if uses_cuda(self.device):
                # CUDA-only branch: NCCL's collectives (the agreement below included), the RNG a
                # checkpoint saves and torch's default allocations follow the current device.
                torch.cuda.set_device(self.device)
            self.dtype = _model_dtype(self.config)
            zero = self.config.zero_optimization
            # Where stage-3 shards live (offload_param; 'none' below stage 3, refused above);
            # an NVMe path is checked here, before any work.
            self.param_store = build_param_store(zero, model, self.dtype, self.comm.world_size, self.comm.rank,
                                                 self.device)
        check_same_everywhere(self.comm, model, self.config)
        if self.config.debug_collectives and self.comm.active:
            from hf_zero.diagnostics.divergence import CollectiveChecker

            self.comm.checker = CollectiveChecker(group, self.comm.rank, self.comm.world_size,
                                                  self.config.debug_collectives_timeout)

        self.module = model
        if self.dtype != torch.float32:
            model.to(self.dtype)
        source = self._meta_source(model, zero.stage) if has_meta_parameters(model) else None
        # mics_shard_size: the stage partitions over its shard group (hf_zero/topology.py).
        self.partition_comm = build_hybrid_collectives(self.comm, zero.mics_shard_size) or self.comm
        self.stage, self.flat_groups, group_spec = build_groups_and_stage(
            zero.stage, model, specs, self.partition_comm,
            bucket_numel=max(1, zero.reduce_bucket_size),   # 0: per parameter
            overlap_comm=zero.overlap_comm, allgather_bucket_numel=max(1, zero.allgather_bucket_size),
            stage3_options=dict(prefetch_numel=zero.stage3_prefetch_bucket_size,
                                max_live_numel=zero.stage3_max_live_parameters,
                                persistence_threshold=zero.stage3_param_persistence_threshold,
                                persist_frozen=zero.stage3_persist_frozen_params,
                                source=source, store=self.param_store))
        enable_hpz(self.stage, self.comm, zero.zero_hpz_partition_size if zero.stage == 3 else 1)
        self.stage.watch_outputs(model)
        self._broadcast_model()
        if zero.zero_quantized_gradients or zero.zero_quantized_weights:
            from hf_zero.quantized_comm import QuantizedCollectives

            quantized = QuantizedCollectives(self.comm)
            self.stage.quantized_gradients = quantized if zero.zero_quantized_gradients else None
            self.stage.quantized_weights = quantized if zero.zero_quantized_weights else None
        # Quantized weight all-gathers overwrite the owner's chunk too: keep exact fp32 masters apart.
        # The offload backend (none / cpu / nvme) decides where masters and optimizer states live.
        # Optimizer offload setup is rank-local (NVMe: the swap directory's checks): agreed here.
        with rank_local_step(self.comm, "hf_zero.initialize (optimizer offload setup)"):
            self.offload = build_optimizer_offload(zero, self.stage.owned_params(), self.comm.rank,
                                                   force_copy=zero.zero_quantized_weights)
            self.masters: MasterWeights = self.offload.masters
            for group in self.flat_groups:   # GatheredParameters(modifier_rank=...) edits reach the masters
                if hasattr(group, "on_shard_modified"):
                    group.on_shard_modified.append(self._reload_masters)

            # Each optimizer group steps the master chunks of all its parameter groups (several
            # at stage 3, one per unit; none for a group emptied by freezing).
            master_groups: list[list[torch.Tensor]] = [[] for _ in specs]
            for spec_index, masters in zip(group_spec, self.masters.masters):
                master_groups[spec_index].extend(masters)
            if optimizer is None:
                inner = build_optimizer(self.config.optimizer, master_groups, [s.options for s in specs])
            else:
                rebind_optimizer(optimizer, master_groups)
                inner = optimizer
            bind_tensor_layout(inner, self.stage, self.flat_groups, self.masters.masters)   # Lamb, Muon
            if self.param_store.offloads:
                # Shards on NVMe: pages the optimizer read (setup) or wrote (copy-back) are
                # dropped per sub-group, so no pass over the model holds all shards resident.
                self.offload.on_params_done = self.param_store.drop_pages
            self.offload.attach(inner)
        self.param_store.evict_all()   # pages touched while building masters / states
        self.scaler = build_loss_scaler(self.config.fp16)
        self.optimizer = ZeroOptimizer(inner, self.stage, self.offload, self.scaler, self.partition_comm,
                                       float(self.config.gradient_clipping), self._fused_update(inner))
        if lr_scheduler is None and self.config.scheduler is not None:
            lr_scheduler = build_scheduler(self.config.scheduler, self.optimizer)
        elif callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
            lr_scheduler = lr_scheduler(self.optimizer)
        self.lr_scheduler = lr_scheduler

        self.gradient_accumulation_steps: int = self.config.gradient_accumulation_steps
        self.micro_steps = 0
        self.global_steps = 0
        self.carried_rng_states: dict[str, dict] = {}   # RNG of ranks a loaded checkpoint had and this run lacks
        self.timers = StepTimers(self.device) if self.config.wall_clock_breakdown else None
        self.stage.timers = self.timers
        self.last_report: dict[str, float] = {}   # the latest per-step report (integrations log it)
        self._bytes_at_report = 0
        # In-place sharding: integrations call model.no_sync() / model.zero_grad().
        model.no_sync = self.no_sync
        model.zero_grad = self.zero_grad
        # model.save_pretrained gathers (stage 3); model.state_dict() refuses to return empty tensors
        self._undo_save_hooks = install_save_hooks(self)
        self.comm.stats.reset()

    def _fused_update(self, inner: torch.optim.Optimizer):
        """hf_zero_kernels' one-pass AdamW, only when asked for (``fused_kernels: "triton"``).
        "auto" keeps the inner torch optimizer (fused AdamW on CUDA and CPU) until the Triton
        kernels have passed ``make gpu-check`` on a device (docs/kernels.md, docs/gpu.md)."""
        from hf_zero.optim.fused_step import FusedAdamW, fused_supported

        if self.config.fused_kernels != "triton":
            return None
        if not fused_supported(inner):
            raise ValueError(f"fused_kernels='triton' needs torch.optim.AdamW without amsgrad/maximize, "
                             f"got {type(inner).__name__}")
        if not self.offload.updates_on_device:
            raise ValueError("fused_kernels='triton' runs the update on the device; offload_optimizer runs it "
                             "on the CPU (use 'auto' or 'off')")
        return FusedAdamW(inner, self.masters.owned_params, keeps_copy=self.masters.keeps_copy, backend="triton")

    # ---- training loop ------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.timers is None:
            return self.module(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.timers.tokens += ids.numel() if isinstance(ids, torch.Tensor) else 0
        with self.timers.phase("forward"):
            return self.module(*args, **kwargs)

    forward = __call__

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: x loss scale (fp16) / gradient accumulation steps."""
        return loss.float() * (self.scaler.scale / self.gradient_accumulation_steps)

    def _reload_masters(self, group, ranges: list[tuple[int, int, int]]) -> None:
        """Shard ranges of ``group`` were edited outside the optimizer (GatheredParameters with
        modifier_rank): re-read the master elements there whose parameter value no longer
        equals the master rounded to the parameter's dtype. Every other master element stays
        bit-identical (re-reading it from a bf16 parameter would drop its low bits)."""
        if not self.masters.keeps_copy:
            return   # the parameter chunk is the master itself
        group_index = self.flat_groups.index(group)
        chunks = self.masters.owned_params[group_index]

        def fill(offset: int, part: torch.Tensor, chunk: torch.Tensor, start: int) -> None:
            edited = chunk.narrow(0, start + offset, part.numel())
            part.copy_(torch.where(part.to(edited.dtype) == edited, part, edited.to(part.dtype)))

        for chunk, start, length in ranges:
            self.offload.write_state("master", group_index, chunk, start, length,
                                     lambda offset, part, c=chunks[chunk], s=start: fill(offset, part, c, s))

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the scaled loss; reductions are deferred until the boundary micro-step."""
        context = contextlib.nullcontext() if self.is_gradient_accumulation_boundary() else self.no_sync()
        with context, timed(self.timers, "backward"):
            self.scale_loss(loss).backward()

    def step(self) -> None:
        """Optimizer + scheduler step at the accumulation boundary; always counts a micro-step."""
        if self.is_gradient_accumulation_boundary():
            with timed(self.timers, "optimizer"):
                self.optimizer.step()
            if self.lr_scheduler is not None and not self.optimizer.step_was_skipped:
                self.lr_scheduler.step()
            self.count_optimizer_step()
        self.micro_steps += 1

    def count_optimizer_step(self) -> None:
        """Count one optimizer step and emit the per-step report every ``steps_per_print`` steps.
        ``step()`` calls it; loops that call ``engine.optimizer.step()`` themselves (the HF
        Trainer, accelerate) get it from a step hook the integrations install."""
        self.global_steps += 1
        if self.timers is not None:
            self.timers.steps += 1
        if self.global_steps % self.config.steps_per_print == 0:
            self._report()

    def _report(self) -> None:
        """Per-step averages since the last report, logged on rank 0 and kept in last_report."""
        report: dict[str, float] = {"grad_norm": self.optimizer.last_grad_norm or 0.0,
                                    "loss_scale": self.scaler.scale}
        total = self.comm.stats.total_bytes()
        if self.timers is not None:
            steps = max(1, self.timers.steps)
            report.update(self.timers.summary())
            report["comm_bytes"] = (total - self._bytes_at_report) / steps
        self._bytes_at_report = total
        if self.config.memory_breakdown:
            report.update({f"memory/{k}_bytes": v for k, v in self.memory_breakdown().items()})
            report["memory/peak_rss_bytes"] = peak_rss_bytes()
        self.last_report = report
        if self.comm.rank == 0:
            logger.info(format_report(self.global_steps, report))

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.stage.no_sync()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad()

    def train(self, mode: bool = True) -> "ZeroEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "ZeroEngine":
        return self.train(False)

    # ---- introspection ------------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def get_global_grad_norm(self) -> Optional[float]:
        """Norm of the full (unscaled, unclipped) gradient at the last optimizer step."""
        return self.optimizer.last_grad_norm

    def memory_breakdown(self) -> dict[str, int]:
        """This rank's resident bytes by category (persistent_params, params, grads, master_params,
        optimizer_states, comm_buffers, offload_buffers, total), each storage counted once; plus
        where the optimizer masters/states are (offload_host, offload_nvme; see docs/offload.md)."""
        groups = self._parameter_groups()
        grouped = {id(p) for g in groups for p in g.params}
        other_params = [p for p in self.module.parameters() if id(p) not in grouped]
        stage_tensors = self.stage.memory_tensors()
        result = bytes_by_category({
            "persistent_params": stage_tensors.get("persistent_params", []),
            "params": [t for g in groups for t in g.storage_tensors()] + other_params,
            "grads": stage_tensors.get("grads", []),
            "master_params": self.masters.tensors(),
            "optimizer_states": self.optimizer.state_tensors(),
            "comm_buffers": stage_tensors.get("comm_buffers", []),
            "offload_buffers": self.offload.buffer_tensors(),
        })
        # Where the optimizer masters/states are: 'offload_host' bytes resident on the host
        # (cpu backend: masters + states; nvme: swap buffers), 'offload_nvme' bytes in swap files.
        result.update(self.offload.memory_by_location())
        # Stage-3 parameter shards kept in host memory / swap files by offload_param.
        result.update(self.param_store.memory_by_location())
        return result

    def comm_stats(self, by_group: bool = False) -> dict:
        """Bytes and calls per collective kind since the last reset (see comm.py's note);
        ``by_group``: {process group label: {kind: ...}} ("world", or "shard" / "replica"
        with ``mics_shard_size``)."""
        return self.comm.stats.by_group() if by_group else self.comm.stats.snapshot()

    def reset_comm_stats(self) -> None:
        self.comm.stats.reset()

    def destroy(self, unshard: bool = True) -> None:
        """Remove hooks and the routed methods; drop optimizer state and buffers.

        Stage 3: with ``unshard`` every rank gets whole parameters back (a usable plain
        model; a collective). ``unshard=False`` leaves them empty, for a model that does not
        fit one rank (save it first with ``save_16bit_model`` or ``save_checkpoint``)."""
        self.stage.wait_for_reductions()
        self.stage.remove_hooks()
        if unshard and hasattr(self.stage, "unshard"):
            self.stage.unshard()
        for name in ("no_sync", "zero_grad"):
            self.module.__dict__.pop(name, None)
        self._undo_save_hooks()
        for g in self.flat_groups:
            for p in g.params:
                p.grad = None
        self.optimizer.inner.state.clear()
        self.offload.close()   # swap files removed, threads joined
        self.param_store.close()   # parameter swap files (mapped shards stay readable)
        for group in self.optimizer.inner.param_groups:   # a user-held optimizer must not pin the masters
            group["params"] = []

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None):
        """Sharded, atomic checkpoint on every rank (see hf_zero/checkpoint/save.py); returns its path."""
        from hf_zero.checkpoint import save_checkpoint

        path = save_checkpoint(self, save_dir, tag, client_state)
        self.param_store.evict_all()   # NVMe-mapped shards the save read
        return path

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False):
        """Exact resume from any world size / stage; returns (path, client_state)."""
        from hf_zero.checkpoint import load_checkpoint

        result = load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states,
                                 load_module_only)
        self.param_store.evict_all()   # NVMe-mapped shards the load wrote
        return result

    def save_16bit_model(self, save_dir: str, dtype: Optional[torch.dtype] = None,
                         max_shard_size: Union[int, str] = "50GB", is_main_process: bool = True) -> None:
        """Write the model as ``save_pretrained`` lays it out (safetensors, config, index) from
        rank 0; all ranks call it. Stage 3 gathers one output shard at a time (checkpoint/export.py)."""
        from hf_zero.checkpoint.export import save_model_hf

        save_model_hf(self.module, save_dir, dtype or self.dtype, is_writer=self.comm.rank == 0 and is_main_process,
                      max_shard_size=max_shard_size, comm=self.comm)
        if self.comm.active:
            dist.barrier(group=self.comm.group)

    # ---- setup helpers ------------------------------------------------------------------
    def _parameter_groups(self) -> list:
        """Every group that owns parameter storage: trainable, plus stage 3's frozen groups."""
        return list(self.flat_groups) + list(getattr(self.stage, "frozen_groups", []))

    def _meta_source(self, model: nn.Module, stage: int):
        """Values for a model built under ``zero_init`` (see meta_init.py's note): stage 3
        reads them shard by shard; stages 0-2 materialise every parameter whole here."""
        from hf_zero.stages.stage3_units import find_unit_modules
        from hf_zero.meta_init import ParameterSource, pending_seed, set_parameter_tensor

        # The seed crosses ranks on a device the group's backend serves (NCCL: this rank's
        # GPU, gloo: the host); a host tensor on an NCCL-only group raises.
        where = (collective_device(dist.get_backend(self.comm.group), self.device) if self.comm.active
                 else torch.device("cpu"))
        seed = torch.tensor([pending_seed()], dtype=torch.int64, device=where)
        self.comm.broadcast(seed)   # rank 0's seed: every rank computes identical values
        source = ParameterSource(model, find_unit_modules(model), int(seed.item()), self.device)
        source.materialise_buffers()
        if stage == 3:
            return source
        with torch.no_grad():
            for name, p in model.named_parameters():
                set_parameter_tensor(p, source.full(name, p))
        source.close()
        return None

    def _broadcast_model(self) -> None:
        """Start every rank from rank 0's weights and buffers, as DDP does."""
        if not self.comm.active:
            return
        trainable = {id(p) for g in self._parameter_groups() for p in g.params}
        with torch.no_grad():
            for g in self.flat_groups:
                for tensor in g.broadcast_tensors():
                    self.comm.broadcast(tensor)
            for p in self.module.parameters():
                if id(p) not in trainable:
                    self.comm.broadcast(p.data)
            for b in self.module.buffers():
                self.comm.broadcast(b)


def initialize(model: nn.Module, config: Union[HfZeroConfig, dict, str, None] = None,
               optimizer: Optional[torch.optim.Optimizer] = None, lr_scheduler: Any = None,
               group: Optional[dist.ProcessGroup] = None) -> ZeroEngine:
    """Shard ``model`` in place and return its engine.

    ``config``: an :class:`HfZeroConfig`, a DeepSpeed-style dict, a JSON/YAML path or inline
    JSON. ``optimizer``: an elementwise torch optimizer over the model's parameters (built
    from ``config["optimizer"]`` when omitted). ``lr_scheduler``: a scheduler, or a callable
    taking the engine's optimizer (built from ``config["scheduler"]`` when omitted).
    ``group``: the data-parallel process group (default: the world; none: one process).
    """
    if group is None and not (dist.is_available() and dist.is_initialized()) and \
            int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} (a launcher started several processes) but "
                           "torch.distributed has no process group: call torch.distributed.init_process_group("
                           "backend=...) before hf_zero.initialize (accelerate and the Trainer do it for you), "
                           "or every rank would train alone")
    config = load_config(config)
    # The one environment switch: debug mode must be reachable without editing configs.
    if os.environ.get("HF_ZERO_DEBUG_COLLECTIVES", "") not in ("", "0"):
        config = config.replace(debug_collectives=True)
    return ZeroEngine(model, config, optimizer, lr_scheduler, group)
