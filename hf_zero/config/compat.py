"""DeepSpeed configs as users have them: aliases, and the keys hf_zero does not honour.

[Note: unhonoured DeepSpeed keys]
Every key DeepSpeed accepts loads. Each is either honoured with DeepSpeed's meaning, or
reported once, naming the key and what hf_zero does instead. A key whose value would
change numerics or memory and that hf_zero does not honour (``severe``) is an error unless
the config sets ``allow_unhonoured_keys: true``; then it is a warning like the others.
``hf-zero check-config FILE`` lists them all. Before validation, DeepSpeed's aliases are
rewritten to the canonical keys (``bfloat16`` -> ``bf16``, the old ``stage3_gather_fp16_...``
name, ``cpu_offload: true``, optimizer type names in any case).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

from hf_zero.config.schema import AUTO, IGNORED_DEEPSPEED_KEYS, OPTIMIZER_TYPES, HfZeroConfig

ALLOW_KEY = "allow_unhonoured_keys"


@dataclass(frozen=True)
class Unhonoured:
    key: str         # dotted key path as written in the config
    instead: str     # what hf_zero does instead
    severe: bool     # changes numerics or memory: an error unless allow_unhonoured_keys


# Field names DeepSpeed's pydantic zero config accepts besides their "stage3_" aliases.
STAGE3_SHORT_NAMES = ("prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold",
                       "max_live_parameters", "max_reuse_distance", "gather_16bit_weights_on_model_save",
                       "module_granularity_threshold", "use_all_reduce_for_fetch_params")


def normalise_aliases(data: dict, problems: list[tuple[str, str]]) -> dict:
    """A copy of ``data`` with DeepSpeed's alternative spellings rewritten to hf_zero's keys."""
    data = copy.deepcopy(data)
    if "bfloat16" in data:
        alias = data.pop("bfloat16")
        if "bf16" in data:
            problems.append(("bfloat16", "both 'bf16' and its alias 'bfloat16' are given; keep one"))
        else:
            data["bf16"] = alias
    zero = data.get("zero_optimization")
    if isinstance(zero, dict):
        old = "stage3_gather_fp16_weights_on_model_save"
        if old in zero:
            zero.setdefault("stage3_gather_16bit_weights_on_model_save", zero.pop(old))
        for short in STAGE3_SHORT_NAMES:   # DeepSpeed's zero config takes both spellings
            if short in zero:
                if f"stage3_{short}" in zero:
                    problems.append((f"zero_optimization.{short}", f"both '{short}' and 'stage3_{short}' are given"))
                else:
                    zero[f"stage3_{short}"] = zero.pop(short)
        _legacy_offload(zero)
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("type"), str):
        canonical = {t.lower(): t for t in OPTIMIZER_TYPES}
        optimizer["type"] = canonical.get(optimizer["type"].lower(), optimizer["type"])
    return data


def _legacy_offload(zero: dict) -> None:
    """DeepSpeed's deprecated offload switches (still accepted there) -> the offload sections."""
    pin = zero.pop("cpu_offload_use_pin_memory", None)
    for old, section in (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param")):
        if zero.pop(old, None) is True and section not in zero:
            zero[section] = {"device": "cpu", **({} if pin is None else {"pin_memory": pin})}


def _get(data: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _present(data: dict, path: str) -> bool:
    parent, _, leaf = path.rpartition(".")
    node = _get(data, parent) if parent else data
    return isinstance(node, dict) and leaf in node


# (key, is it unhonoured given its value, what happens instead, severe)
Rule = tuple[str, Callable[[Any], bool], str, bool]
RULES: list[Rule] = [
    ("fp16.fp16_master_weights_and_grads", lambda v: v is True,
     "fp32 master weights and gradients are kept (more memory, other rounding)", True),
    ("bf16.bf16_master_weights_and_grads", lambda v: v is True,
     "fp32 master weights and gradients are kept (more memory, other rounding)", True),
    ("bf16.bf16_optimizer_states", lambda v: v is True, "optimizer states are kept in fp32", True),
    ("bf16.check_grad_overflow", lambda v: v is True,
     "bf16 steps are not skipped on non-finite gradients", True),
    ("zero_optimization.offload_optimizer.pipeline_read", lambda v: v is False,
     "NVMe reads are always overlapped with the update", False),
    ("zero_optimization.offload_optimizer.pipeline_write", lambda v: v is False,
     "NVMe writes are always overlapped with the update", False),
    ("zero_optimization.reduce_scatter", lambda v: v is False,
     "gradients are reduce-scattered (the same sums; DeepSpeed would all-reduce)", False),
    ("zero_optimization.stage3_max_reuse_distance", lambda v: True,
     "a block is kept gathered only when its backward directly follows its forward", False),
    ("zero_optimization.contiguous_gradients", lambda v: v is False, "gradients are always contiguous", False),
    ("zero_optimization.allgather_partitions", lambda v: v is False,
     "partitions are all-gathered (DeepSpeed would broadcast them)", False),
    ("zero_optimization.round_robin_gradients", lambda v: v is True,
     "ownership is always bucket-interleaved", False),
    ("optimizer.params.max_grad_norm", lambda v: isinstance(v, (int, float)) and v > 0,
     "Lamb does not clip by itself; use gradient_clipping", True),
    ("optimizer.params.eps_inside_sqrt", lambda v: v is True, "Lamb adds eps outside the square root", True),
    ("optimizer.type", lambda v: v in ("OneBitAdam", "ZeroOneAdam", "OneBitLamb"),
     "runs as Adam (OneBitAdam, ZeroOneAdam) or Lamb (OneBitLamb) without 1-bit compression (other numerics, "
     "more traffic)", True),
    # Keys outside the schema whose presence with these values changes numerics.
    ("amp", lambda v: isinstance(v, dict) and v.get("enabled") is True, "apex AMP is not used", True),
] + [(section, lambda v: isinstance(v, dict) and v.get("enabled") is True, f"{what} is not applied", True)
     for section, what in (("progressive_layer_drop", "progressive layer dropping"),
                           ("quantize_training", "quantization-aware training (MoQ)"),
                           ("compression_training", "compression"), ("curriculum_learning", "the curriculum"),
                           ("data_efficiency", "data sampling / routing"), ("sparse_attention", "sparse attention"),
                           ("weight_quantization", "weight quantization"), ("hybrid_engine", "the hybrid engine"))]


# How each rule's condition reads in docs/config.md.
WHEN = {
    "zero_optimization.offload_optimizer.pipeline_read": "false",
    "zero_optimization.offload_optimizer.pipeline_write": "false",
    "zero_optimization.reduce_scatter": "false",
    "zero_optimization.stage3_max_reuse_distance": "set",
    "zero_optimization.contiguous_gradients": "false",
    "zero_optimization.allgather_partitions": "false",
    "optimizer.params.max_grad_norm": "> 0",
    "optimizer.type": "OneBitAdam, ZeroOneAdam, OneBitLamb",
    "amp": "enabled",
    **{section: "enabled" for section in ("progressive_layer_drop", "quantize_training", "compression_training",
                                          "curriculum_learning", "data_efficiency", "sparse_attention",
                                          "weight_quantization", "hybrid_engine")},
}


_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "torch.float32": "fp32", "fp16": "fp16", "float16": "fp16",
                "torch.float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16"}
# Keys honoured only when they name the training dtype (hf_zero reduces and accumulates in it).
DTYPE_KEYS = {"communication_data_type": "reductions run in the parameter dtype",
              "data_types.grad_accum_dtype": "gradients accumulate in the parameter dtype"}
_BY_VALUE = {"communication_data_type", "data_types"}   # accepted sections reported only by DTYPE_KEYS


def _training_dtype(data: dict) -> str | None:
    """fp32 / fp16 / bf16 from the precision sections; None while one is still "auto"."""
    flags = [_get(data, f"{k}.enabled") for k in ("fp16", "bf16")]
    if AUTO in flags:
        return None
    return "fp16" if flags[0] is True else "bf16" if flags[1] is True else "fp32"


def find_unhonoured(data: dict) -> list[Unhonoured]:
    """Every key of the (alias-normalised) DeepSpeed dict ``data`` that hf_zero does not
    honour, in a stable order; see [Note: unhonoured DeepSpeed keys]."""
    found: dict[str, Unhonoured] = {}
    for key, instead in DTYPE_KEYS.items():
        value = _get(data, key)
        if value is not None and _DTYPE_NAMES.get(str(value)) != _training_dtype(data):
            found[key] = Unhonoured(key, f"{instead} ({_training_dtype(data) or 'auto'})", True)

    for key, applies, instead, severe in RULES:
        if _present(data, key) and key not in found and applies(_get(data, key)):
            found[key] = Unhonoured(key, instead, severe)
    for key, reason in IGNORED_DEEPSPEED_KEYS.items():
        if key not in found and key not in _BY_VALUE and _present(data, key):
            found[key] = Unhonoured(key, f"ignored: {reason}", False)
    for name, sub in data.items():   # ignored keys listed by their last part only (any section)
        if isinstance(sub, dict) and name not in found:   # a whole ignored section is reported once
            for key in sub:
                path = f"{name}.{key}"
                if key in IGNORED_DEEPSPEED_KEYS and path not in found:
                    found[path] = Unhonoured(path, f"ignored: {IGNORED_DEEPSPEED_KEYS[key]}", False)
    return list(found.values())


def check_unhonoured(notes: list[Unhonoured], config: HfZeroConfig) -> list[tuple[str, str]]:
    """The problems to raise: severe keys, unless the config opts in."""
    if config.allow_unhonoured_keys:
        return []
    return [(n.key, f"not honoured by hf_zero: {n.instead}. This changes numerics or memory; set "
             f"'{ALLOW_KEY}': true to run anyway, or remove the key") for n in notes if n.severe]


_ADAM = {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "amsgrad", "bias_correction"}
_LAMB = {"lr", "betas", "eps", "weight_decay", "bias_correction", "max_coeff", "min_coeff", "max_grad_norm",
         "eps_inside_sqrt", "amsgrad"}
_ONE_BIT = {"freeze_step", "cuda_aware", "comm_backend_name"}
# The parameters DeepSpeed's constructor of each type takes (others would raise there).
OPTIMIZER_PARAMS: dict[str, set[str]] = {
    "Adam": _ADAM, "AdamW": _ADAM, "Lamb": _LAMB,
    "Lion": {"lr", "betas", "weight_decay"},
    "Adagrad": {"lr", "eps", "weight_decay", "lr_decay", "initial_accumulator_value"},
    "Muon": {"lr", "momentum", "weight_decay", "muon_lr", "adam_lr", "betas", "eps", "ns_method"},
    "OneBitAdam": _ADAM | _ONE_BIT,
    "ZeroOneAdam": _ADAM | _ONE_BIT | {"var_freeze_step", "var_update_scaler", "local_step_scaler",
                                       "local_step_clipper"},
    "OneBitLamb": _LAMB | _ONE_BIT | {"coeff_beta", "factor_max", "factor_min", "factor_threshold"},
}


def check_optimizer_params(data: dict) -> list[tuple[str, str]]:
    """Parameters the optimizer type does not take (DeepSpeed would fail in its constructor),
    and values of the ones it takes that hf_zero does not implement."""
    optimizer = data.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("params"), dict):
        return []
    kind = optimizer.get("type", "AdamW")
    allowed = OPTIMIZER_PARAMS.get(kind)
    if allowed is None:
        return []   # an unknown type is reported by the schema
    params = optimizer["params"]
    problems = [(f"optimizer.params.{k}", f"is not a parameter of optimizer type {kind} (it takes "
                 f"{', '.join(sorted(allowed))})") for k in params if k not in allowed]
    if params.get("amsgrad") is True and kind not in ("Adam", "AdamW"):
        problems.append(("optimizer.params.amsgrad", f"{kind} has no AMSGrad variant"))
    if params.get("bias_correction") is False and kind in ("Adam", "AdamW"):
        problems.append(("optimizer.params.bias_correction", "Adam without bias correction is not implemented"))
    return problems


# Keys that may be "auto" in a config file (where transformers' HfTrainerDeepSpeedConfig or
# accelerate's DeepSpeed plugin fills them) and that the engine needs as values; the batch
# sizes are checked by resolve_batch_sizes, the optimizer/scheduler values by their builders.
ENGINE_AUTO_KEYS = ("fp16.enabled", "bf16.enabled", "gradient_clipping", "zero_optimization.stage",
                    "zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size",
                    "zero_optimization.stage3_prefetch_bucket_size",
                    "zero_optimization.stage3_param_persistence_threshold",
                    "zero_optimization.offload_optimizer.device", "zero_optimization.offload_optimizer.nvme_path",
                    "zero_optimization.offload_param.device", "zero_optimization.offload_param.nvme_path")


def unresolved_autos(config: HfZeroConfig) -> list[tuple[str, str]]:
    """The ENGINE_AUTO_KEYS still "auto" (an integration must have filled them by initialize)."""
    problems = []
    for key in ENGINE_AUTO_KEYS:
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        if value == AUTO:
            problems.append((key, "is still 'auto'; an integration must resolve it (accelerate fills it from its "
                                  "DeepSpeed plugin, the Trainer from TrainingArguments), or give a value"))
    return problems
