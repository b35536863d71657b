"""Typed, frozen configuration objects mirroring DeepSpeed's JSON keys.

Every field carries its documentation in ``metadata["doc"]``; ``docs/config.md`` is
generated from these (``python -m hf_zero.config.docgen``) and a test keeps it in sync.
Field metadata understood by the parser (``parse.py``):

- ``doc``: one-line description (required).
- ``min`` / ``max``: inclusive numeric bounds; ``gt``: exclusive lower bound.
- ``choices``: allowed values for a string field.
- ``auto``: the value may be the string ``"auto"``, left for an integration to fill.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

AUTO = "auto"
"""Sentinel accepted where ``metadata["auto"]`` is set; integrations replace it."""

AutoInt = Union[int, str, None]
AutoFloat = Union[float, str, None]


def _f(default: Any, doc: str, **meta: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **meta})


def _sub(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass(frozen=True, kw_only=True)
class OptimizerParams:
    lr: AutoFloat = _f(1e-3, "Learning rate.", min=0.0, auto=True)
    betas: Union[tuple, str] = _f((0.9, 0.999), "Adam (beta1, beta2).", auto=True)
    eps: AutoFloat = _f(1e-8, "Adam epsilon.", gt=0.0, auto=True)
    weight_decay: AutoFloat = _f(0.0, "Weight decay (decoupled for AdamW).", min=0.0, auto=True)
    adam_w_mode: bool = _f(True, "For type Adam: decoupled weight decay (AdamW), as DeepSpeed's default.")
    torch_adam: bool = _f(False, "Accepted for compatibility; hf_zero always runs torch's Adam kernels.")
    amsgrad: bool = _f(False, "Use the AMSGrad variant.")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    type: str = _f("AdamW", "Optimizer built by hf_zero when none is passed to initialize().",
                   choices=("Adam", "AdamW"))
    params: OptimizerParams = _sub(OptimizerParams, "Optimizer hyperparameters.")


@dataclass(frozen=True, kw_only=True)
class SchedulerParams:
    warmup_min_lr: AutoFloat = _f(0.0, "WarmupLR/WarmupDecayLR: learning rate at step 0.", min=0.0, auto=True)
    warmup_max_lr: AutoFloat = _f(None, "WarmupLR/WarmupDecayLR: learning rate after warmup "
                                  "(default: the optimizer's lr).", min=0.0, auto=True)
    warmup_num_steps: AutoInt = _f(1000, "Warmup length in optimizer steps (at least 2 is used).",
                                   min=0, auto=True)
    warmup_type: str = _f("log", "Warmup curve.", choices=("log", "linear"))
    total_num_steps: AutoInt = _f(None, "WarmupDecayLR/WarmupCosineLR: total optimizer steps.",
                                  min=1, auto=True)
    warmup_min_ratio: float = _f(0.0, "WarmupCosineLR: lr ratio at step 0.", min=0.0, max=1.0)
    cos_min_ratio: float = _f(1e-4, "WarmupCosineLR: lr ratio at the end of the cosine.", min=0.0, max=1.0)


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    type: str = _f("WarmupLR", "Learning-rate schedule stepped by the engine at each optimizer step.",
                   choices=("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"))
    params: SchedulerParams = _sub(SchedulerParams, "Schedule parameters.")


@dataclass(frozen=True, kw_only=True)
class FP16Config:
    enabled: Union[bool, str] = _f(False, "Train with fp16 parameters/gradients and fp32 master weights.",
                                   auto=True)
    loss_scale: float = _f(0.0, "0 selects dynamic loss scaling; a positive value is a static scale.",
                           min=0.0)
    initial_scale_power: int = _f(16, "Dynamic scaling starts at 2**initial_scale_power.", min=0, max=63)
    loss_scale_window: int = _f(1000, "Clean steps before the scale doubles.", min=1)
    hysteresis: int = _f(2, "Overflows tolerated before the scale halves.", min=1)
    consecutive_hysteresis: bool = _f(False, "Refill hysteresis after every clean step.")
    min_loss_scale: float = _f(1.0, "The scale never drops below this.", gt=0.0)


@dataclass(frozen=True, kw_only=True)
class BF16Config:
    enabled: Union[bool, str] = _f(False, "Train with bf16 parameters/gradients and fp32 master weights.",
                                   auto=True)


@dataclass(frozen=True, kw_only=True)
class OffloadOptimizerConfig:
    device: str = _f("none", "Where the fp32 master weights and Adam states live and the update runs: "
                     "'none' (with the parameters), 'cpu' (host memory, CPU AdamW in sub-groups), 'nvme' "
                     "(files under nvme_path, swapped through host buffers). Stages 1-3; Adam/AdamW only. "
                     "See docs/offload.md.", choices=("none", "cpu", "nvme"))
    nvme_path: Optional[str] = _f(None, "Directory for NVMe swap files (required for 'nvme'; checked for "
                                  "existence, write access and free space at initialize).")
    pin_memory: bool = _f(True, "Pin host masters/states/buffers when a CUDA device exists (no effect on CPU).")
    buffer_count: int = _f(4, "NVMe: host swap buffers, one sub-group each (at least 2 are used: one "
                           "is read while another is updated and a third written).", min=1)
    fast_init: bool = _f(False, "Accepted for compatibility.")
    ratio: float = _f(1.0, "Accepted for compatibility.", min=0.0, max=1.0)


@dataclass(frozen=True, kw_only=True)
class OffloadParamConfig:
    device: str = _f("none", "Where each rank's stage-3 parameter shards live at rest: 'none' (with the "
                     "parameters), 'cpu' (host memory; gathered blocks on the accelerator), 'nvme' (a mapped "
                     "file per shard under nvme_path, read ahead along the prefetch order). Stage 3 only. "
                     "See docs/offload.md.", choices=("none", "cpu", "nvme"))
    nvme_path: Optional[str] = _f(None, "Directory for the parameter swap files (required for 'nvme'; checked "
                                  "for existence, write access and free space at initialize).")
    pin_memory: bool = _f(True, "'cpu': pin the host shards when a CUDA device exists (mapped NVMe shards "
                          "are never pinned).")
    buffer_count: int = _f(5, "'nvme' read-ahead: shards of the next units in the prefetch order are read "
                           "ahead up to buffer_count x buffer_size elements.", min=1)
    buffer_size: int = _f(100_000_000, "'nvme' read-ahead: elements per buffer (see buffer_count).", min=1)
    max_in_cpu: int = _f(1_000_000_000, "'nvme': shard elements kept in host memory instead of files (the "
                         "first shards built: the last blocks); the persistent set always stays.", min=0)


@dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    stage: int = _f(0, "0: data parallel; 1: + optimizer states partitioned; 2: + gradients; "
                    "3: + parameters (gathered per transformer block).", min=0, max=3)
    # 25 MiB of fp32 (DDP's bucket), not DeepSpeed's 5e8: a bucket is transient memory
    # during the step, and 5e8 elements make one bucket of most models (docs/config.md).
    reduce_bucket_size: AutoInt = _f(6_553_600, "Elements per gradient-reduction bucket.", min=1, auto=True)
    allgather_bucket_size: AutoInt = _f(6_553_600, "Elements all-gathered at a time after the step.",
                                        min=1, auto=True)
    overlap_comm: bool = _f(True, "Launch gradient reductions asynchronously during backward.")
    contiguous_gradients: bool = _f(True, "Accepted for compatibility; gradients are always contiguous.")
    reduce_scatter: bool = _f(True, "Accepted for compatibility; stages 1-2 always reduce-scatter.")
    allgather_partitions: bool = _f(True, "Accepted for compatibility; partitions are always all-gathered.")
    round_robin_gradients: bool = _f(False, "Accepted for compatibility.")
    offload_optimizer: OffloadOptimizerConfig = _sub(OffloadOptimizerConfig, "Optimizer-state offload.")
    offload_param: OffloadParamConfig = _sub(OffloadParamConfig, "Stage-3 parameter offload.")
    sub_group_size: int = _f(1_000_000_000, "Optimizer elements per offload sub-group: the unit of CPU "
                             "update, copy-back and NVMe swap (each NVMe buffer holds one sub-group's "
                             "master and Adam states).", min=1)
    stage3_prefetch_bucket_size: AutoInt = _f(50_000_000, "Stage 3: parameter elements gathered ahead of use "
                                              "along the recorded order (0 disables prefetch).",
                                              min=0, auto=True)
    stage3_param_persistence_threshold: AutoInt = _f(100_000, "Stage 3: parameters with at most this many "
                                                     "elements stay gathered (still partitioned for "
                                                     "gradients and optimizer states).", min=0, auto=True)
    stage3_max_live_parameters: int = _f(1_000_000_000, "Stage 3: prefetch stops when this many parameter "
                                         "elements are gathered (a unit needed now is always gathered).", min=0)
    stage3_persist_frozen_params: bool = _f(False, "Stage 3 (hf_zero extension): keep frozen parameters (e.g. a "
                                           "LoRA model's base) gathered on every rank: no traffic for them, "
                                           "plain data parallelism's memory. Default: sharded like the rest.")
    stage3_max_reuse_distance: int = _f(1_000_000_000, "Stage 3: accepted; a block whose backward follows its "
                                       "forward directly is always kept gathered, others are released.", min=0)
    stage3_gather_16bit_weights_on_model_save: bool = _f(False, "Stage 3: accepted; save_16bit_model always gathers "
                                                       "shard by shard.")
    zero_quantized_gradients: bool = _f(False, "ZeRO++: reduce gradients as blockwise int8 (stages 1-2; "
                                        "dequantized and summed in fp32 by each chunk's owner).")
    zero_quantized_weights: bool = _f(False, "ZeRO++: all-gather updated partitions as blockwise int8 "
                                      "(stages 1-2; every replica gets the same dequantized weights).")


@dataclass(frozen=True, kw_only=True)
class HfZeroConfig:
    train_batch_size: AutoInt = _f(None, "Global batch = micro batch x accumulation x data-parallel world.",
                                   min=1, auto=True)
    train_micro_batch_size_per_gpu: AutoInt = _f(None, "Samples per rank per forward.", min=1, auto=True)
    gradient_accumulation_steps: AutoInt = _f(None, "Micro-steps per optimizer step (derived when absent).",
                                              min=1, auto=True)
    gradient_clipping: AutoFloat = _f(1.0, "Clip the global gradient norm to this; 0 disables. Default 1.0 "
                                      "as in DeepSpeed 0.19.", min=0.0, auto=True)
    optimizer: Optional[OptimizerConfig] = _f(None, "Optimizer built when initialize() gets none.")
    scheduler: Optional[SchedulerConfig] = _f(None, "LR schedule built when initialize() gets none.")
    fp16: FP16Config = _sub(FP16Config, "fp16 mixed precision with loss scaling.")
    bf16: BF16Config = _sub(BF16Config, "bf16 mixed precision.")
    zero_optimization: ZeroConfig = _sub(ZeroConfig, "ZeRO partitioning.")
    steps_per_print: int = _f(10, "Log progress every this many optimizer steps.", min=1)
    wall_clock_breakdown: bool = _f(False, "Time forward/backward/reduction/optimizer/all-gather per step and "
                                    "report them (with tokens/s and bytes moved) every steps_per_print steps.")
    memory_breakdown: bool = _f(False, "Add memory by category and peak RSS to the per-step report.")
    fused_kernels: str = _f("auto", "Optimizer update and norm through hf_zero_kernels: 'auto' = Triton "
                            "on CUDA, torch elsewhere; 'triton' = always (CPU only under TRITON_INTERPRET=1); "
                            "'off' = torch's AdamW.", choices=("auto", "triton", "off"))
    debug_collectives: bool = _f(False, "Check before every collective that all ranks issue the same one; "
                                 "raise naming the first divergence instead of hanging (also "
                                 "HF_ZERO_DEBUG_COLLECTIVES=1). Costs a store round trip per collective.")
    debug_collectives_timeout: float = _f(60.0, "Seconds to wait for the other ranks in that check.", gt=0.0)

    @property
    def stage(self) -> int:
        return self.zero_optimization.stage

    def replace(self, **changes: Any) -> "HfZeroConfig":
        return dataclasses.replace(self, **changes)


# DeepSpeed keys hf_zero accepts and ignores (with a warning) so that existing
# ds_config.json files load unchanged. Keys not listed here and not in the schema are errors.
IGNORED_DEEPSPEED_KEYS: dict[str, str] = {
    "prescale_gradients": "gradients are always summed then divided once",
    "gradient_predivide_factor": "gradients are always summed then divided once",
    "communication_data_type": "reductions run in the parameter dtype",
    "zero_allow_untested_optimizer": "any elementwise torch optimizer is accepted",
    "zero_force_ds_cpu_optimizer": "not applicable",
    "activation_checkpointing": "use the model's gradient checkpointing",
    "flops_profiler": "not implemented",
    "tensorboard": "use the Trainer's report_to",
    "wandb": "use the Trainer's report_to",
    "csv_monitor": "not implemented",
    "comms_logger": "use engine.comm_stats()",
    "dump_state": "not implemented",
    "amp": "use bf16 or fp16",
    "sparse_gradients": "not implemented",
    "zero_optimization.elastic_checkpoint": "checkpoints always reshard",
    "zero_optimization.load_from_fp32_weights": "master weights always load from fp32",
    "zero_optimization.ignore_unused_parameters": "unused parameters are always handled",
    "zero_optimization.cpu_offload": "use offload_optimizer.device",
    "zero_optimization.memory_efficient_linear": "not needed: stage 3 frees a released unit's storage in place, "
                                                 "so weight views saved for backward hold no memory",
    "zero_optimization.stage3_gather_fp16_weights_on_model_save":
        "alias; use stage3_gather_16bit_weights_on_model_save",
    "bf16.immediate_grad_update": "gradients are always accumulated in place",
    "fp16.auto_cast": "inputs are not cast",
}
