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
    # DeepSpeed's parameter names for every optimizer type it builds; a parameter the chosen
    # type does not take is an error (DeepSpeed passes them to the constructor), see
    # hf_zero/optim/build.py. None means the type's own default (listed per key).
    lr: AutoFloat = _f(None, "Learning rate (default: Adam/AdamW/Lamb/Lion 1e-3, Adagrad 1e-2, Muon 0.02 for "
                       "its matrices and 3e-4 for the rest).", min=0.0, auto=True)
    betas: Union[tuple, str, None] = _f(None, "(beta1, beta2) (default: Adam/AdamW/Lamb (0.9, 0.999), Lion "
                                        "(0.9, 0.99), Muon's auxiliary Adam (0.9, 0.95)).", auto=True)
    eps: AutoFloat = _f(None, "Epsilon (default: Adam/AdamW/Lamb 1e-8, Adagrad and Muon's auxiliary Adam "
                        "1e-10).", gt=0.0, auto=True)
    weight_decay: AutoFloat = _f(0.0, "Weight decay (decoupled for AdamW, Lion and Muon; in the update for "
                                 "Lamb; L2 for Adam without adam_w_mode and Adagrad).", min=0.0, auto=True)
    adam_w_mode: bool = _f(True, "For type Adam: decoupled weight decay (AdamW), as DeepSpeed's default.")
    torch_adam: bool = _f(False, "Accepted for compatibility; hf_zero always runs torch's Adam kernels.")
    amsgrad: bool = _f(False, "Adam/AdamW: use the AMSGrad variant.")
    bias_correction: bool = _f(True, "Lamb: bias-corrected step size lr x sqrt(1 - beta2^t) / (1 - beta1^t).")
    max_coeff: float = _f(10.0, "Lamb: upper clamp of the per-tensor trust ratio ||w|| / ||update||.", gt=0.0)
    min_coeff: float = _f(0.01, "Lamb: lower clamp of the trust ratio.", min=0.0)
    max_grad_norm: float = _f(0.0, "Lamb: not honoured when > 0 (use gradient_clipping, which hf_zero applies "
                              "to the global norm).", min=0.0)
    eps_inside_sqrt: bool = _f(False, "Lamb: not honoured when true (eps is added outside the square root).")
    momentum: float = _f(0.95, "Muon: momentum of its matrices (Nesterov, as DeepSpeed).", min=0.0, max=1.0)
    muon_lr: Optional[float] = _f(None, "Muon: learning rate of the matrices (overrides lr there).", min=0.0)
    adam_lr: Optional[float] = _f(None, "Muon: learning rate of the auxiliary Adam (overrides lr there).",
                                  min=0.0)
    ns_method: str = _f("gram", "Muon: Newton-Schulz variant; hf_zero runs the standard quintic iteration in "
                        "fp32 for both (the Gram form is the same map, computed differently).",
                        choices=("gram", "standard"))
    lr_decay: float = _f(0.0, "Adagrad: learning-rate decay (torch.optim.Adagrad's).", min=0.0)
    initial_accumulator_value: float = _f(0.0, "Adagrad: initial value of the squared-gradient sum.", min=0.0)
    # 1-bit optimizers (OneBitAdam, ZeroOneAdam, OneBitLamb): their compression is not
    # implemented; with allow_unhonoured_keys they run uncompressed and these are unused.
    freeze_step: int = _f(100000, "1-bit optimizers: warmup steps before compression (unused: no compression).",
                          min=0)
    cuda_aware: bool = _f(False, "1-bit optimizers: unused (no compression).")
    comm_backend_name: str = _f("nccl", "1-bit optimizers: unused (no compression).")
    coeff_beta: float = _f(0.9, "OneBitLamb: unused (no compression).")
    factor_max: float = _f(4.0, "OneBitLamb: unused (no compression).")
    factor_min: float = _f(0.5, "OneBitLamb: unused (no compression).")
    factor_threshold: float = _f(0.1, "OneBitLamb: unused (no compression).")
    var_freeze_step: int = _f(100000, "ZeroOneAdam: unused (no compression).", min=0)
    var_update_scaler: int = _f(16, "ZeroOneAdam: unused (no compression).", min=1)
    local_step_scaler: int = _f(32678, "ZeroOneAdam: unused (no compression).", min=1)
    local_step_clipper: int = _f(16, "ZeroOneAdam: unused (no compression).", min=1)


# DeepSpeed's optimizer type names (matched case-insensitively, as DeepSpeed does).
OPTIMIZER_TYPES = ("Adam", "AdamW", "Lamb", "Lion", "Adagrad", "Muon", "OneBitAdam", "ZeroOneAdam", "OneBitLamb")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    type: str = _f("AdamW", "Optimizer built by hf_zero when none is passed to initialize() (case-insensitive). "
                   "1-bit types are refused unless allow_unhonoured_keys (then they run uncompressed).",
                   choices=OPTIMIZER_TYPES)
    params: OptimizerParams = _sub(OptimizerParams, "Optimizer hyperparameters.")


@dataclass(frozen=True, kw_only=True)
class SchedulerParams:
    warmup_min_lr: AutoFloat = _f(0.0, "WarmupLR/WarmupDecayLR: learning rate of the first two "
                                  "optimizer steps (DeepSpeed's schedule, see below).", min=0.0, auto=True)
    warmup_max_lr: AutoFloat = _f(None, "WarmupLR/WarmupDecayLR: learning rate after warmup "
                                  "(default: each group's lr for WarmupLR, 0.001 for WarmupDecayLR, "
                                  "as DeepSpeed).", min=0.0, auto=True)
    warmup_num_steps: AutoInt = _f(1000, "Warmup length in optimizer steps (at least 2 is used).",
                                   min=0, auto=True)
    warmup_type: str = _f("log", "Warmup curve.", choices=("log", "linear"))
    total_num_steps: AutoInt = _f(None, "WarmupDecayLR/WarmupCosineLR: total optimizer steps.",
                                  min=1, auto=True)
    warmup_min_ratio: float = _f(0.0, "WarmupCosineLR: lr ratio of the second optimizer step "
                                 "(the first uses 0, as DeepSpeed).", min=0.0, max=1.0)
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
    loss_scale_window: int = _f(1000, "The scale doubles after window + 1 clean steps, "
                                   "then every window clean steps (DeepSpeed's count).", min=1)
    hysteresis: int = _f(2, "Overflows that halve the scale: the first hysteresis - 1 "
                           "only spend a unit.", min=1)
    consecutive_hysteresis: bool = _f(False, "Refill hysteresis after every clean step.")
    min_loss_scale: float = _f(1.0, "The scale never drops below this; an overflow at this "
                                "scale raises (as DeepSpeed).", gt=0.0)
    fp16_master_weights_and_grads: bool = _f(False, "DeepSpeed: fp16 master weights and gradients. Not "
                                             "honoured when true: hf_zero keeps fp32 masters (more memory, "
                                             "other numerics), so it needs allow_unhonoured_keys.")


@dataclass(frozen=True, kw_only=True)
class BF16Config:
    enabled: Union[bool, str] = _f(False, "Train with bf16 parameters/gradients and fp32 master weights.",
                                   auto=True)
    bf16_master_weights_and_grads: bool = _f(False, "DeepSpeed: bf16 master weights and gradients. Not "
                                             "honoured when true (fp32 masters); needs allow_unhonoured_keys.")
    bf16_optimizer_states: bool = _f(False, "DeepSpeed: bf16 optimizer states. Not honoured when true (fp32 "
                                     "states); needs allow_unhonoured_keys.")
    check_grad_overflow: bool = _f(False, "DeepSpeed: skip bf16 steps with non-finite gradients. Not honoured "
                                   "when true (the step runs); needs allow_unhonoured_keys.")


@dataclass(frozen=True, kw_only=True)
class OffloadOptimizerConfig:
    device: str = _f("none", "Where the fp32 master weights and Adam states live and the update runs: "
                     "'none' (with the parameters), 'cpu' (host memory, CPU AdamW in sub-groups), 'nvme' "
                     "(files under nvme_path, swapped through host buffers). Stages 1-3; Adam/AdamW only. "
                     "See docs/offload.md. 'auto': filled by accelerate.", choices=("none", "cpu", "nvme"), auto=True)
    nvme_path: Optional[str] = _f(None, "Directory for NVMe swap files (required for 'nvme'; checked for "
                                  "existence, write access and free space at initialize).", auto=True)
    pin_memory: bool = _f(True, "Pin host masters/states/buffers when a CUDA device exists (no effect on CPU).")
    buffer_count: int = _f(4, "NVMe: host swap buffers, one sub-group each (at least 2 are used: one "
                           "is read while another is updated and a third written).", min=1)
    fast_init: bool = _f(False, "Accepted for compatibility (initialisation speed only).")
    ratio: float = _f(1.0, "Fraction of this rank's optimizer sub-groups offloaded, as in DeepSpeed: the first "
                      "int((1 - ratio) * n) of its n sub-groups (by order) keep masters and Adam states on the "
                      "parameters' device and are updated there; the rest go to offload_optimizer.device. Set "
                      "sub_group_size so that a rank has several sub-groups (one sub-group is always "
                      "offloaded). Stages 1-3 (DeepSpeed: stage 3 only). See docs/offload.md.", min=0.0, max=1.0)
    pipeline_read: bool = _f(False, "NVMe: overlap reading the next sub-group with the update. hf_zero always "
                             "does (see docs/offload.md); false is reported as not honoured.")
    pipeline_write: bool = _f(False, "NVMe: overlap writing the previous sub-group with the update. Always on, "
                              "as pipeline_read.")


@dataclass(frozen=True, kw_only=True)
class OffloadParamConfig:
    device: str = _f("none", "Where each rank's stage-3 parameter shards live at rest: 'none' (with the "
                     "parameters), 'cpu' (host memory; gathered blocks on the accelerator), 'nvme' (a mapped "
                     "file per shard under nvme_path, read ahead along the prefetch order). Stage 3 only. "
                     "See docs/offload.md. 'auto': filled by accelerate.", choices=("none", "cpu", "nvme"), auto=True)
    nvme_path: Optional[str] = _f(None, "Directory for the parameter swap files (required for 'nvme'; checked "
                                  "for existence, write access and free space at initialize).", auto=True)
    pin_memory: bool = _f(True, "'cpu': pin the host shards when a CUDA device exists (mapped NVMe shards "
                          "are never pinned).")
    buffer_count: int = _f(5, "'nvme' read-ahead: shards of the next units in the prefetch order are read "
                           "ahead up to buffer_count x buffer_size elements.", min=1)
    buffer_size: int = _f(100_000_000, "'nvme' read-ahead: elements per buffer (see buffer_count).", min=1)
    max_in_cpu: int = _f(1_000_000_000, "'nvme': shard elements kept in host memory instead of files (the "
                         "first shards built: the last blocks); the persistent set always stays.", min=0)


@dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    stage: AutoInt = _f(0, "0: data parallel; 1: + optimizer states partitioned; 2: + gradients; "
                        "3: + parameters (gathered per transformer block). 'auto': filled by accelerate's "
                        "DeepSpeed plugin.", min=0, max=3, auto=True)
    # 25 MiB of fp32 (DDP's bucket), not DeepSpeed's 5e8: a bucket is transient memory
    # during the step, and 5e8 elements make one bucket of most models (docs/config.md).
    reduce_bucket_size: AutoInt = _f(6_553_600, "Elements per gradient-reduction bucket (0, as DeepSpeed "
                                     "allows: every parameter reduced on its own).", min=0, auto=True)
    allgather_bucket_size: AutoInt = _f(6_553_600, "Elements all-gathered at a time after the step (0: one "
                                        "bucket at a time).", min=0, auto=True)
    overlap_comm: bool = _f(True, "Launch gradient reductions asynchronously during backward.")
    contiguous_gradients: bool = _f(True, "Accepted for compatibility; gradients are always contiguous.")
    reduce_scatter: bool = _f(True, "Stages 1-2 always reduce-scatter; false (DeepSpeed: all-reduce, then keep "
                              "the own partition) gives the same sums and is reported as not honoured.")
    allgather_partitions: bool = _f(True, "Accepted for compatibility; partitions are always all-gathered.")
    round_robin_gradients: bool = _f(False, "Accepted for compatibility.")
    offload_optimizer: OffloadOptimizerConfig = _sub(OffloadOptimizerConfig, "Optimizer-state offload.")
    offload_param: OffloadParamConfig = _sub(OffloadParamConfig, "Stage-3 parameter offload.")
    sub_group_size: int = _f(1_000_000_000, "Optimizer elements per offload sub-group: the unit of CPU "
                             "update, copy-back and NVMe swap (each NVMe buffer holds one sub-group's "
                             "master and Adam states). 0 (DeepSpeed: one parameter per sub-group): at most "
                             "one bucket chunk per sub-group.", min=0)
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
    stage3_max_reuse_distance: int = _f(1_000_000_000, "Stage 3: not honoured when set (reported): a block whose "
                                       "backward follows its forward directly is kept gathered, others are "
                                       "released (never more memory than DeepSpeed's rule).", min=0)
    stage3_gather_16bit_weights_on_model_save: Union[bool, str] = _f(False, "Stage 3: accepted ('auto' too, as "
                                                                    "accelerate writes); save_16bit_model always "
                                                                    "gathers shard by shard.", auto=True)
    mics_shard_size: int = _f(-1, "Hybrid sharding (MiCS / HSDP, stages 1-3): model states are partitioned within "
                              "groups of this many consecutive ranks (a node, typically) and replicated across "
                              "groups; gradients are reduce-scattered in the group and all-reduced across groups. "
                              "Must divide the world size; -1: partition over all ranks.", min=-1)
    zero_hpz_partition_size: int = _f(1, "ZeRO++ hpZ (stage 3): parameters stay partitioned over all ranks, and "
                                      "each rank also keeps a secondary copy of a released unit partitioned "
                                      "within its group of this many consecutive ranks, so backward gathers "
                                      "stay inside the group (costs 1/k of the unit's bytes per rank). Must "
                                      "divide the world size; 1: off.", min=1)
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
    fused_kernels: str = _f("auto", "Optimizer update and norm through hf_zero_kernels' Triton kernels: "
                            "'auto' = torch's fused AdamW everywhere until the Triton path has passed "
                            "`make gpu-check` on a device; 'triton' = opt in (CPU only under "
                            "TRITON_INTERPRET=1); 'off' = torch's AdamW.", choices=("auto", "triton", "off"))
    debug_collectives: bool = _f(False, "Check before every collective that all ranks issue the same one; "
                                 "raise naming the first divergence instead of hanging (also "
                                 "HF_ZERO_DEBUG_COLLECTIVES=1). Costs a store round trip per collective.")
    debug_collectives_timeout: float = _f(60.0, "Seconds to wait for the other ranks in that check.", gt=0.0)
    presence_timeout: float = _f(60.0, "Seconds a call that gathers stage-3 parameters on every rank "
                                 "(model.state_dict(), model.save_pretrained(), engine.save_16bit_model(), "
                                 "accelerate's get_state_dict / save_model) waits for the other ranks to enter it; "
                                 "then the ranks that came raise, naming the absent ones, instead of hanging in "
                                 "the first gather.", gt=0.0)
    allow_unhonoured_keys: bool = _f(False, "hf_zero extension: run a config holding DeepSpeed keys that change "
                                     "numerics or memory and that hf_zero does not honour (each still warned "
                                     "about by name); default: such keys are errors. See docs/config.md.")

    @property
    def stage(self) -> AutoInt:
        """``zero_optimization.stage``: an int once integrations have resolved "auto"."""
        return self.zero_optimization.stage

    def replace(self, **changes: Any) -> "HfZeroConfig":
        return dataclasses.replace(self, **changes)


# DeepSpeed keys hf_zero accepts and ignores (with a warning) so that existing
# ds_config.json files load unchanged. Keys not listed here and not in the schema are errors.
IGNORED_DEEPSPEED_KEYS: dict[str, str] = {
    "prescale_gradients": "gradients are always summed then divided once",
    "gradient_predivide_factor": "gradients are always summed then divided once",
    "communication_data_type": "honoured when it names the training dtype (reductions run in it)",
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
    "zero_optimization.memory_efficient_linear": "not needed: stage 3 frees a released unit's storage in place, "
                                                 "so weight views saved for backward hold no memory",
    "bf16.immediate_grad_update": "gradients are always accumulated in place",
    "fp16.auto_cast": "inputs are not cast",
    # Keys of DeepSpeed features outside ZeRO data parallelism, or tuning of its own kernels.
    "aio": "hf_zero's NVMe swapper issues its own reads and writes (docs/offload.md); I/O tuning not applied",
    "checkpoint": "checkpoints always reshard; tag validation not applied",
    "data_types": "grad_accum_dtype honoured when it names the training dtype (gradients accumulate in it)",
    "torch_autocast": "use the model's dtype via bf16/fp16, or autocast in the script",
    "compile": "use torch.compile in the script",
    "data_efficiency": "not implemented",
    "curriculum_learning": "not implemented",
    "compression_training": "not implemented",
    "elasticity": "not implemented",
    "autotuning": "not implemented",
    "nebula": "not implemented",
    "sparse_attention": "not implemented",
    "pipeline": "no pipeline parallelism",
    "timers": "use wall_clock_breakdown",
    "dataloader_drop_last": "the script's data loader decides",
    "zero_optimization.use_multi_rank_bucket_allreduce": "gradients are always reduce-scattered",
    "zero_optimization.stage3_model_persistence_threshold": "stage3_param_persistence_threshold alone decides",
    "zero_optimization.model_persistence_threshold": "stage3_param_persistence_threshold alone decides",
    "zero_optimization.stage3_module_granularity_threshold": "units are transformer blocks",
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": "parameters are all-gathered",
    "comms_config": "use engine.comm_stats()",
    "disable_allgather": "partitions are always all-gathered",
    "seq_parallel_communication_data_type": "no sequence parallelism",
    "graph_harvesting": "not applicable",
    "eigenvalue": "not implemented",
    "progressive_layer_drop": "not implemented",
    "quantize_training": "not implemented",
    "hybrid_engine": "not implemented",
    "weight_quantization": "not implemented",
    "comet": "use the Trainer's report_to",
    "use_data_before_expert_parallelism": "no expert parallelism",
    "tensor_parallel": "no tensor parallelism",
    "zero_optimization.zeropp_loco_param": "not implemented",
    "zero_optimization.mics_hierarchical_params_gather": "not implemented",
    "zero_optimization.pipeline_loading_checkpoint": "not applicable",
    "zero_optimization.override_module_apply": "not applicable",
    "zero_optimization.zenflow": "not implemented",
    "monitor_config": "use the Trainer's report_to",
    "zero_optimization.log_trace_cache_warnings": "not applicable",
    "zero_optimization.zero_quantized_nontrainable_weights": "frozen weights are gathered unquantized",
    "zero_optimization.legacy_stage1": "not applicable",
    "zero_optimization.offload_param.fast_init": "not applicable",
    "zero_optimization.offload_param.pipeline_read": "parameter shards are read ahead along the prefetch order",
    "zero_optimization.offload_param.pipeline_write": "parameter shards are written in place",
    "zero_optimization.offload_optimizer.super_offload": "not implemented",
    "zero_optimization.offload_optimizer.cpuadam_cores_perc": "the CPU update uses torch's threads",
}
