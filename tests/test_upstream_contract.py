"""The private (or semi-private) APIs of torch, transformers, accelerate and peft that hf_zero
overrides, patches, sets or calls still exist with the parameters hf_zero relies on, and the
library still reaches them. An upgrade that renames one fails here, loudly, instead of silently
disabling an override. Each entry is listed, with why hf_zero needs it, in docs/design.md
("Upstream contract"); keep the two in step."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest


def _resolve(path: str):
    """``package.module:Attr.attr`` -> the object."""
    module_name, _, attrs = path.partition(":")
    obj = importlib.import_module(module_name)
    for name in filter(None, attrs.split(".")):
        obj = getattr(obj, name)
    return obj


def _params(obj) -> list[str]:
    return list(inspect.signature(obj).parameters)


# Methods hf_zero overrides (HfZeroTrainerMixin) or wraps: the parameter names must match
# exactly, since the library calls them positionally and hf_zero forwards them to super().
EXACT = {
    "transformers:Trainer._clip_grad_norm": ["self", "model"],
    "transformers:Trainer._get_grad_norm": ["self", "model", "grad_norm"],
    "transformers:Trainer._build_accelerator_args": ["self", "kwargs"],
    "transformers:Trainer._prepare_for_training": ["self", "max_steps", "train_dataloader", "resume_from_checkpoint"],
    "transformers:Trainer._save_optimizer_and_scheduler": ["self", "output_dir"],
    "transformers:Trainer._load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    "transformers:Trainer._load_optimizer_and_scheduler": ["self", "checkpoint"],
    "transformers:Trainer._load_best_model": ["self"],
    "transformers:Trainer.save_model": ["self", "output_dir", "_internal_call"],
    "transformers:Trainer.create_optimizer": ["self", "model"],
    "accelerate:Accelerator.prepare": ["self", "args", "device_placement"],
    "accelerate:Accelerator.clip_grad_norm_": ["self", "parameters", "max_norm", "norm_type"],
    "accelerate:Accelerator.get_state_dict": ["self", "model", "unwrap"],
    "accelerate:Accelerator.save_state": ["self", "output_dir", "safe_serialization", "save_model_func_kwargs"],
    "accelerate:Accelerator.backward": ["self", "loss", "kwargs"],
    "accelerate:Accelerator.register_save_state_pre_hook": ["self", "hook"],
    "accelerate:Accelerator.register_load_state_pre_hook": ["self", "hook"],
    "transformers:PreTrainedModel._init_weights": ["self", "module"],
    "transformers:PreTrainedModel._adjust_missing_and_unexpected_keys": ["self", "loading_info"],
    "transformers.core_model_loading:revert_weight_conversion": ["model", "state_dict"],
    "transformers.modeling_utils:remove_tied_weights_from_state_dict": ["state_dict", "model"],
    "transformers.core_model_loading:dot_natural_key": ["s"],
    "transformers.core_model_loading:WeightTransform.add_tensor":
        ["self", "target_key", "source_key", "source_pattern", "future"],
    "transformers.core_model_loading:WeightTransform.was_used": ["self"],
    "peft.tuners.lora:LoraLayer.reset_lora_parameters": ["self", "adapter_name", "init_lora_weights"],
    # partitioned_load.py: overridden, wrapped or called positionally
    "transformers:Trainer._move_model_to_device": ["self", "model", "device"],
    "transformers:PreTrainedModel.resize_token_embeddings":
        ["self", "new_num_tokens", "pad_to_multiple_of", "mean_resizing"],
    "transformers.modeling_utils:_get_dtype":
        ["dtype", "checkpoint_files", "config", "sharded_metadata", "state_dict", "weights_only", "hf_quantizer"],
    "transformers:GenerationMixin.adjust_generation_fn":
        ["self", "generation_config", "from_auto_class", "from_pipeline", "pretrained_model_name_or_path",
         "cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder",
         "trust_remote_code", "kwargs"],
    "transformers:TrainingArguments.__post_init__": ["self"],
}

# Functions hf_zero calls (by keyword where it can): these parameters must be among theirs.
AT_LEAST = {
    # decoupled_weight_decay: see test_adam_shim_reaches_decoupled_weight_decay (torch >= 2.7 only).
    "torch.optim.adam:adam": ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps",
                              "foreach", "fused", "grad_scale", "amsgrad", "beta1",
                              "beta2", "lr", "weight_decay", "eps", "maximize"],
    # torch's collective under the name this torch has (hf_zero/_torch_compat.py).
    "hf_zero._torch_compat:all_gather_single": ["output_tensor", "input_tensor", "group", "async_op"],
    "hf_zero._torch_compat:reduce_scatter_single": ["output", "input", "op", "group", "async_op"],
    "torch.optim.optimizer:register_optimizer_step_pre_hook": ["hook"],
    "transformers:PreTrainedModel._from_config": ["config"],
    "transformers.conversion_mapping:get_model_conversion_mapping": ["model"],
    "transformers.core_model_loading:rename_source_key":
        ["source_key", "weight_renamings", "weight_converters", "base_model_prefix", "meta_state_dict"],
    "transformers.utils.loading_report:log_state_dict_report":
        ["model", "pretrained_model_name_or_path", "ignore_mismatched_sizes", "loading_info", "logger"],
    "transformers.core_model_loading:WeightConverter": ["source_patterns", "target_patterns", "operations"],
    "transformers.core_model_loading:WeightRenaming": ["source_patterns", "target_patterns"],
    "transformers.core_model_loading:MergeModulelist": ["dim"],
    "transformers.core_model_loading:Concatenate": ["dim"],
    "transformers:PreTrainedModel.from_pretrained": ["pretrained_model_name_or_path", "model_args", "config"],
    "peft:PeftModel.load_adapter": ["model_id", "adapter_name"],
}

# Builtins (no Python signature): they must exist and be callable.
CALLABLE = [
    "torch._C:_current_graph_task_id",
    "torch.autograd:Variable._execution_engine.queue_callback",
    "torch.distributed.distributed_c10d:_get_default_store",
]

# Attributes hf_zero sets or reads that the library itself reads or writes: the library's
# source must still name them where hf_zero expects (else the flag is silently ignored).
READ_BY_LIBRARY = {
    ("accelerate.accelerator", "_is_accelerate_prepared"): "prepare() returns flagged objects untouched",
    ("transformers.distributed.fsdp", "_is_fsdp_managed_module"): "generate() defaults synced_gpus on",
    ("transformers.core_model_loading", "_weight_conversions"): "save_pretrained reverts load-time conversions",
    ("transformers.core_model_loading", "_original_source_patterns"): "hf_layout compares conversions",
    ("transformers.core_model_loading", "_original_target_patterns"): "hf_layout compares conversions",
    ("torch.optim.lr_scheduler", "_step_count"): "import-deepspeed positions the scheduler",
    ("torch.optim.lr_scheduler", "_last_lr"): "import-deepspeed positions the scheduler",
}

# Overrides are useless unless the library still calls them: the Trainer's source must.
CALLED_BY_TRAINER = ["self._clip_grad_norm(", "self._get_grad_norm(", "self._build_accelerator_args(",
                     "self._prepare_for_training(", "self._save_optimizer_and_scheduler(",
                     "self._load_from_checkpoint(", "self._load_optimizer_and_scheduler(",
                     "self._load_best_model(", "self.create_optimizer(", "self.save_model("]


@pytest.mark.parametrize("path", sorted(EXACT))
def test_overridden_or_wrapped_signature_unchanged(path):
    assert _params(_resolve(path)) == EXACT[path], f"{path} changed: hf_zero's override/wrapper needs an update"


@pytest.mark.parametrize("path", sorted(AT_LEAST))
def test_called_function_keeps_parameters(path):
    missing = [p for p in AT_LEAST[path] if p not in _params(_resolve(path))]
    assert not missing, f"{path} lost parameters {missing} that hf_zero passes"


@pytest.mark.parametrize("path", CALLABLE)
def test_private_builtin_exists(path):
    assert callable(_resolve(path)), path


@pytest.mark.parametrize("module, name", sorted(READ_BY_LIBRARY))
def test_flag_still_read_by_library(module, name):
    assert name in inspect.getsource(importlib.import_module(module)), \
        f"{module} no longer mentions {name} ({READ_BY_LIBRARY[(module, name)]})"


def test_trainer_still_calls_the_overridden_methods():
    source = inspect.getsource(importlib.import_module("transformers.trainer"))
    missing = [call for call in CALLED_BY_TRAINER if call not in source]
    assert not missing, f"transformers.Trainer no longer calls {missing}: hf_zero's overrides would be skipped"


def test_training_arguments_dict_fields_and_loading_info():
    from transformers import TrainingArguments
    from transformers.utils.loading_report import LoadStateDictInfo

    # ZeroTrainingArguments appends "hf_zero" so a JSON string for it is parsed like deepspeed's.
    assert "deepspeed" in TrainingArguments._VALID_DICT_FIELDS
    # pretrained_weights.py builds one by keyword.
    fields = {f.name for f in dataclasses.fields(LoadStateDictInfo)}
    assert {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs", "conversion_errors",
            "skipped_pp_keys"} <= fields   # skipped_pp_keys: transformers >= 5.16 (pyproject.toml's lower bound)


def test_adam_shim_reaches_decoupled_weight_decay():
    # cpu_adam passes decoupled_weight_decay: torch >= 2.7's adam takes it; on older torch the shim
    # sends AdamW to torch.optim.adamw.adamw, which must then take the same parameters as adam.
    from hf_zero import _torch_compat

    adam, adamw = _resolve("torch.optim.adam:adam"), _resolve("torch.optim.adamw:adamw")
    if "decoupled_weight_decay" in _params(adam):
        assert _torch_compat.adam is adam
    else:
        assert _params(adamw) == _params(adam)


def test_accelerate_returns_flagged_models_unwrapped():
    # accelerate >= 1.14: prepare_model returns a model flagged _is_accelerate_prepared untouched.
    # Older versions read the flag only for data loaders, optimizers and schedulers and wrap the
    # sharded model (stage 3 then fails in backward on its released parameters).
    from accelerate import Accelerator

    assert 'getattr(model, "_is_accelerate_prepared", False)' in inspect.getsource(Accelerator.prepare_model)


def test_accelerate_hook_call_shapes():
    # hf_zero's save hook takes (models, weights, output_dir), its load hook (models, input_dir).
    source = inspect.getsource(importlib.import_module("accelerate.accelerator"))
    assert "hook(self._models, weights, output_dir)" in source and "hook(models, input_dir)" in source


def test_from_pretrained_keywords_are_all_known_to_partitioned_loading():
    """partitioned_load.py sorts every keyword transformers' from_pretrained takes into honoured,
    passed on or refused; a new one in an upgrade must be sorted too (else it would reach the
    config as an override, silently)."""
    import re

    from transformers import PreTrainedModel

    from hf_zero import partitioned_load

    source = inspect.getsource(PreTrainedModel.from_pretrained)
    taken = set(re.findall(r'kwargs\.pop\("(\w+)"', source))
    dropped = re.search(r"for name in \[([^\]]*)\]", source)   # the list of keywords it ignores
    taken |= set(re.findall(r'"(\w+)"', dropped.group(1))) if dropped else set()
    taken |= {p for p in _params(PreTrainedModel.from_pretrained)
              if p not in ("cls", "pretrained_model_name_or_path", "model_args", "kwargs")}
    known = set(partitioned_load._IGNORED) | set(partitioned_load._REFUSED) | set(partitioned_load._PASSED_ON)
    assert "device_map" in taken and "dtype" in taken
    assert taken <= known, f"from_pretrained keywords unknown to partitioned_load.py: {sorted(taken - known)}"

def test_peft_loads_adapters_through_the_models_load_state_dict():
    # partitioned_load.py captures the adapter state dict at model.load_state_dict
    source = inspect.getsource(importlib.import_module("peft.utils.save_and_load"))
    assert "model.load_state_dict(peft_model_state_dict" in source
