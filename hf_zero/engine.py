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
from typing import TYPE_CHECKING, Any, Optional, Union, cast

import torch
import torch.distributed as dist
from torch import nn

from hf_zero.accounting import bytes_by_category
from hf_zero.checkpoint.model_hooks import install_save_hooks
from hf_zero.comm import Collectives
from hf_zero.config import HfZeroConfig, load_config
from hf_zero.diagnostics.step_report import format_report, peak_rss_bytes, timed
from hf_zero.engine_build import agree_on_model, build_update, check_and_place, resolve_scheduler, shard_model
from hf_zero.offload import OptimizerOffload
from hf_zero.optim.loss_scaler import build_loss_scaler
from hf_zero.optim.master_weights import MasterWeights
from hf_zero.optim.zero_optimizer import ZeroOptimizer

if TYPE_CHECKING:
    from hf_zero.engine_checkpoint import EngineCheckpointState

logger = logging.getLogger(__name__)


class ZeroEngine:
    """Holds the sharded model, its optimizer and schedule; see module docstring."""

    partition_comm: Collectives   # set by engine_build.shard_model (the MiCS/hybrid group, or comm)

    def __init__(self, model: nn.Module, config: HfZeroConfig, optimizer: Optional[torch.optim.Optimizer],
                 lr_scheduler: Any, group: Optional[dist.ProcessGroup]):
        # The phases of engine_build.py, in order; each returns what it built ([Note: explicit
        # wiring] there). The engine keeps references to what they built, and changes none of it.
        self.comm = Collectives(group, presence_timeout_s=float(config.presence_timeout))
        ctx = check_and_place(self.comm, model, config, optimizer)
        agree_on_model(self.comm, model, ctx.config)
        self.config, self.device, self.dtype, self.timers = ctx.config, ctx.device, ctx.dtype, ctx.timers
        self.param_store = ctx.param_store
        self.module = model
        sharded = shard_model(ctx, model)
        self.stage, self.flat_groups, self.partition_comm = sharded.stage, sharded.flat_groups, sharded.partition_comm
        update = build_update(ctx, sharded, optimizer)
        self.offload: OptimizerOffload = update.offload
        self.masters: MasterWeights = self.offload.masters
        self.param_store.evict_all()   # pages touched while building masters / states
        self.scaler = build_loss_scaler(self.config.fp16)
        self.optimizer = ZeroOptimizer(update.inner, self.stage, self.offload, self.scaler, self.partition_comm,
                                       float(cast(float, self.config.gradient_clipping)))   # "auto" refused
        self.lr_scheduler = resolve_scheduler(lr_scheduler, self.config, self.optimizer)

        # resolve_batch_sizes (in check_and_place) filled it
        self.gradient_accumulation_steps: int = cast(int, self.config.gradient_accumulation_steps)
        self.micro_steps = 0
        self.global_steps = 0
        self.carried_rng_states: dict[str, dict] = {}   # RNG of ranks a loaded checkpoint had and this run lacks
        self.last_report: dict[str, float] = {}   # the latest per-step report (integrations log it)
        self._bytes_at_report = 0
        # In-place sharding: integrations call model.no_sync() / model.zero_grad().
        setattr(model, "no_sync", self.no_sync)       # instance attributes over the model's own
        setattr(model, "zero_grad", self.zero_grad)
        # stage 3: model.save_pretrained and model.state_dict() gather when every rank calls them
        self._undo_save_hooks = install_save_hooks(self, self.comm)
        self.comm.stats.reset()

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
        groups = self.stage.parameter_groups()
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
        if unshard:
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

    def zero_optimization_stage(self) -> int:
        """The ZeRO stage (0-3), as DeepSpeed's engine reports it."""
        return self.stage.stage

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint_state(self) -> "EngineCheckpointState":
        """What a checkpoint saves and where it loads it ([Note: checkpoint interface] in
        hf_zero/checkpoint/state.py); read at the time of the call."""
        from hf_zero.engine_checkpoint import EngineCheckpointState

        return EngineCheckpointState(self)

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
        self.comm.barrier()


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
