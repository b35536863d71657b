"""transformers' ``from_pretrained`` building partitioned: routed to ``hf_zero.from_pretrained``
while partitioned loading is active.

[Note: partitioned from_pretrained]
DeepSpeed's contract, which scripts are written against: once a ZeRO-3 config object is alive
(``TrainingArguments(deepspeed=...)`` holds an ``HfDeepSpeedConfig``; accelerate's
``DeepSpeedPlugin`` holds one when ``zero3_init_flag`` is set), transformers keeps a weak
reference to it (``integrations/deepspeed.py``: ``set_hf_deepspeed_config``), and every
``from_pretrained`` while that object lives builds the model inside ``deepspeed.zero.Init``:
no rank ever holds the whole model. A model loaded *before* the object exists is built whole
and sharded later by ``deepspeed.initialize``.

hf_zero keeps the same lifetimes with its own switch, and ``is_deepspeed_zero3_enabled()``
stays False (every other branch behind it imports deepspeed; docs/integrations.md). Partitioned
loading is active
- inside ``with hf_zero.zero_init():`` (for the block);
- while an *owner* registered by :func:`activate_for` is alive: a ``ZeroTrainingArguments``
  (or, under ``hf-zero launch``, any ``TrainingArguments``) whose hf_zero config is stage 3,
  and, under ``hf-zero launch`` with accelerate's ``zero3_init_flag``, the ``Accelerator``.
  Owners are held by weak reference, as transformers holds its ``HfDeepSpeedConfig``;
  :func:`deactivate` ends it explicitly (transformers' ``unset_hf_deepspeed_config``).
While active, ``PreTrainedModel.from_pretrained`` (the public classmethod every
``AutoModel*`` class ends in) is replaced by :func:`_from_pretrained_partitioned`, which builds
the model with ``hf_zero.from_pretrained`` (meta parameters + a ``PretrainedWeights`` plan that
``hf_zero.initialize`` reads slice by slice); the original is restored when nothing is active.
Keyword arguments that only steer downloading are honoured, those that change what is built
(``dtype``, config overrides, ``ignore_mismatched_sizes``, ``attn_implementation``) are passed
on, and those that need a whole model on this rank (``device_map``, ``quantization_config``,
a ``state_dict`` ...) raise an error naming the argument.
"""

from __future__ import annotations

import copy
import logging
import os
import types
import warnings
import weakref
from pathlib import Path
from typing import Any, Optional

import torch

from hf_zero.comm import rank_local_call

logger = logging.getLogger(__name__)

_blocks = 0                                   # open zero_init blocks
_owners: dict[int, weakref.ref] = {}          # id(owner) -> weak reference
_original: Any = None                         # PreTrainedModel.__dict__["from_pretrained"] while patched

# Accepted, not passed on: where the files come from (hub / cache, used by local_checkpoint_dir),
# how transformers reads them, or ignored by transformers too. A keyword also in _REFUSED is
# refused when set and dropped when unset (the Auto classes pass trust_remote_code=False).
_IGNORED = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies",
            "trust_remote_code", "adapter_kwargs", "adapter_name", "_from_auto", "_from_pipeline", "_commit_hash",
            "weights_only", "disable_mmap", "low_cpu_mem_usage", "mirror", "_fast_init", "from_tf", "from_flax",
            "offload_state_dict", "tqdm_class", "code_revision", "use_safetensors", "allow_all_kernels")
# Passed on to hf_zero.from_pretrained (build_meta_model); other keywords are config overrides.
# (The upstream contract test checks that these three lists cover every keyword transformers takes.)
_PASSED_ON = ("config", "dtype", "torch_dtype", "attn_implementation", "experts_implementation",
              "generation_config", "ignore_mismatched_sizes", "output_loading_info")
# Need the whole model (or another loader) on this rank: refused, naming the argument.
_REFUSED = {
    "device_map": "hf_zero places each rank's shards itself",
    "max_memory": "hf_zero places each rank's shards itself",
    "offload_folder": "use zero_optimization.offload_param",
    "offload_buffers": "use zero_optimization.offload_param",
    "quantization_config": "quantized weights are not sharded by hf_zero",
    "state_dict": "a state_dict in memory is already whole on this rank",
    "gguf_file": "hf_zero reads safetensors checkpoints",
    "variant": "hf_zero reads the default model.safetensors[.index.json] names",
    "key_mapping": "hf_zero applies the model's own conversion mapping only",
    "tp_plan": "tensor parallelism is not combined with hf_zero sharding",
    "tp_size": "tensor parallelism is not combined with hf_zero sharding",
    "distributed_config": "tensor parallelism is not combined with hf_zero sharding",
    "device_mesh": "tensor parallelism is not combined with hf_zero sharding",
    "use_kernels": "hub kernels are not applied to a partitioned build",
    "trust_remote_code": "custom-code models are not built partitioned (their code is not fetched)",
    "code_revision": "custom-code models are not built partitioned (their code is not fetched)",
    "kernel_config": "hub kernels are not applied to a partitioned build",
    "fusion_config": "fusion patches are not applied to a partitioned build",
}


def partitioned_loading_active() -> bool:
    return _blocks > 0 or any(ref() is not None for ref in _owners.values())


class _Block:
    """``zero_init``'s part: active for the block, nested blocks counted."""

    def __enter__(self) -> None:
        global _blocks
        _blocks += 1
        _sync_patch()

    def __exit__(self, *exc: Any) -> None:
        global _blocks
        _blocks -= 1
        _sync_patch()


def block() -> _Block:
    return _Block()


def activate_for(owner: Any, reason: str) -> None:
    """Partitioned loading while ``owner`` lives (see the note)."""
    if id(owner) in _owners and _owners[id(owner)]() is owner:
        return
    key = id(owner)
    _owners[key] = weakref.ref(owner)
    weakref.finalize(owner, _forget, key)
    logger.info("hf_zero: from_pretrained builds models partitioned (stage 3) from now on: %s", reason)
    _sync_patch()


def deactivate() -> None:
    """End owner-based partitioned loading now (``zero_init`` blocks stay active)."""
    _owners.clear()
    _sync_patch()


def _forget(key: int) -> None:
    ref = _owners.get(key)
    if ref is not None and ref() is None:
        del _owners[key]
    _sync_patch()


def _sync_patch() -> None:
    """Install the wrapper while anything is active; restore transformers' own otherwise."""
    global _original
    active = partitioned_loading_active()
    if active == (_original is not None):
        return
    try:
        from transformers import PreTrainedModel
    except ImportError:   # zero_init without transformers: nothing to route
        return

    if active:
        _original = PreTrainedModel.__dict__["from_pretrained"]
        setattr(PreTrainedModel, "from_pretrained", classmethod(_from_pretrained_partitioned))
    else:
        setattr(PreTrainedModel, "from_pretrained", _original)
        _original = None


def _from_pretrained_partitioned(cls, pretrained_model_name_or_path, *model_args, **kwargs):
    if not partitioned_loading_active() or _original is None:   # an owner died since the patch was read
        original = _original or _transformers_from_pretrained()
        return original.__func__(cls, pretrained_model_name_or_path, *model_args, **kwargs)
    refused = [name for name in _REFUSED if kwargs.get(name) not in (None, False, {}, "")]
    if refused:
        name = refused[0]
        raise ValueError(f"{cls.__name__}.from_pretrained({name}=...) while hf_zero builds models partitioned "
                         f"(stage 3): {_REFUSED[name]}. Drop {name}, or load the model before the stage-3 "
                         f"TrainingArguments / Accelerator exist (outside hf_zero.zero_init) so it is built whole")
    if pretrained_model_name_or_path is None:
        raise ValueError(f"{cls.__name__}.from_pretrained(None, ...) while hf_zero builds models partitioned: give the "
                         "checkpoint directory or hub id (hf_zero reads each rank's slices from its files)")
    if model_args:
        raise ValueError(f"{cls.__name__}.from_pretrained: positional model arguments are not supported while hf_zero "
                         "builds models partitioned; pass them as keyword arguments")
    if kwargs.get("use_safetensors") is False:
        raise ValueError(f"{cls.__name__}.from_pretrained(use_safetensors=False): hf_zero reads safetensors only")
    if (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path"):
        raise ValueError(f"{pretrained_model_name_or_path}: a peft adapter directory; under hf_zero stage 3 load the "
                         "base model with from_pretrained, then apply the adapter with peft")
    path = _agreed_checkpoint_dir(pretrained_model_name_or_path, kwargs)
    for name in _IGNORED:
        kwargs.pop(name, None)
    loading_info = kwargs.pop("output_loading_info", False)
    from hf_zero.meta_init import from_pretrained

    model = from_pretrained(path, model_class=cls, **kwargs)
    model.config.name_or_path = str(pretrained_model_name_or_path)   # as transformers records it
    logger.info("hf_zero: %s.from_pretrained(%s) built on the meta device; hf_zero.initialize reads each rank's "
                "slices", cls.__name__, pretrained_model_name_or_path)
    # the plan's report is transformers' own LoadStateDictInfo: the same dict transformers returns
    return (model, model._hf_zero_weights.report.to_dict()) if loading_info else model


def _transformers_from_pretrained():
    from transformers import PreTrainedModel

    return PreTrainedModel.__dict__["from_pretrained"]


@rank_local_call("from_pretrained (finding the checkpoint)")
def _agreed_checkpoint_dir(name_or_path: Any, kwargs: dict) -> Path:
    """local_checkpoint_dir on every rank, agreed: a cache or download failing on one rank (one
    node) is every rank's error, not a wait in hf_zero.from_pretrained's agreement."""
    return local_checkpoint_dir(name_or_path, kwargs)


def local_checkpoint_dir(name_or_path: Any, kwargs: dict) -> Path:
    """The local directory holding the checkpoint: ``name_or_path`` itself (plus ``subfolder``),
    or the hub snapshot huggingface_hub resolves (from its cache when offline)."""
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(name_or_path):
        return Path(name_or_path) / subfolder
    from huggingface_hub import snapshot_download

    # what transformers reads for a safetensors model (not e.g. a repo's extra consolidated.safetensors)
    patterns = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*-of-*.safetensors"]
    root = snapshot_download(str(name_or_path), revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                             token=kwargs.get("token"), force_download=bool(kwargs.get("force_download")),
                             local_files_only=bool(kwargs.get("local_files_only")),
                             allow_patterns=[f"{subfolder}/{p}" if subfolder else p for p in patterns])
    return Path(root) / subfolder


# ---- building the meta model as transformers' from_pretrained would ----------------------------
def build_meta_model(path: Path, files: list[Path], model_class: Any, kwargs: dict) -> Any:
    """``model_class`` (a concrete ``PreTrainedModel`` class or an ``AutoModel*`` class) built on
    the meta device with the config, dtype and generation config transformers' ``from_pretrained``
    would give it. ``kwargs``: ``config`` (an object or a path), ``dtype`` / ``torch_dtype``,
    ``attn_implementation``, ``generation_config``, then config overrides; what the config does
    not take goes to the model's constructor, as in transformers."""
    from transformers import AutoConfig, PreTrainedConfig

    from hf_zero.meta_init import zero_init

    kwargs = dict(kwargs)
    config = kwargs.pop("config", None)
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else torch_dtype   # both given: dtype wins, as in transformers
    implementations = {name: kwargs.pop(name) for name in ("attn_implementation", "experts_implementation")
                       if kwargs.get(name) is not None}
    generation_config = kwargs.pop("generation_config", None)
    is_auto = hasattr(model_class, "from_config")   # AutoModel* classes; concrete classes have _from_config
    if isinstance(config, PreTrainedConfig):
        config, model_kwargs = copy.deepcopy(config), kwargs
    else:
        loader = AutoConfig if is_auto else model_class.config_class
        config, model_kwargs = loader.from_pretrained(config if config is not None else path,
                                                      return_unused_kwargs=True, **kwargs)
    for name, value in implementations.items():   # set on the config, as transformers does
        setattr(config, f"_{name}", value)
    config, dtype = _resolve_dtype(dtype, files, path, config)
    # inside a zero_init block its seed stays (initialisation of missing parameters); else a fresh block
    with torch.device("meta") if _blocks else zero_init():
        build = model_class.from_config if is_auto else model_class._from_config
        model = build(config, dtype=dtype, **model_kwargs)
    if model.can_generate() and hasattr(model, "adjust_generation_fn"):
        # generation_config.json, read as transformers reads it (it passes the same extra kwargs on)
        model.adjust_generation_fn(generation_config, False, None, str(path), cache_dir=None, force_download=False,
                                   proxies=None, local_files_only=True, token=None, revision=None, subfolder="",
                                   trust_remote_code=None, **kwargs)
    return model


def _resolve_dtype(dtype: Any, files: list[Path], path: Path, config: Any) -> tuple[Any, Any]:
    """transformers' own dtype rule (``modeling_utils._get_dtype``): default "auto" = the config's
    ``dtype``, else the checkpoint's first floating tensor's dtype."""
    import json

    from transformers.modeling_utils import _get_dtype

    index = path / "model.safetensors.index.json"
    metadata = json.loads(index.read_text()).get("metadata", {}) if index.is_file() else None
    return _get_dtype("auto" if dtype is None else dtype, [str(f) for f in files], config, metadata, None, True)


def guard_unbuilt(model: Any) -> None:
    """A model built on the meta device is usable only after ``hf_zero.initialize``: its forward
    and ``resize_token_embeddings`` say so instead of failing on meta tensors. (Module-level
    functions, bound per instance: a deep copy rebinds to the copy, pickling keeps working.)"""
    model.register_forward_pre_hook(_refuse_unsharded_forward)
    model.resize_token_embeddings = types.MethodType(resize_token_embeddings, model)
    _watch_adapter_loading()


def _built_on_meta(model: Any) -> bool:
    first = next(model.parameters(), None)
    return first is not None and first.is_meta


def _refuse_unsharded_forward(module: Any, args: Any) -> None:
    if _built_on_meta(module):
        raise RuntimeError(f"{type(module).__name__} was built partitioned by hf_zero (its parameters are on the meta "
                           "device) and has not been sharded yet: pass it to hf_zero.initialize (the Trainer and "
                           "Accelerator.prepare do), or load it outside hf_zero.zero_init / before the stage-3 "
                           "TrainingArguments or Accelerator exist to get a whole model")


def resize_token_embeddings(self: Any, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                            mean_resizing: bool = True) -> Any:
    """transformers' ``resize_token_embeddings``, refused on a meta-built model when the size changes."""
    current = self.get_input_embeddings().weight.shape[0]
    wanted = current if new_num_tokens is None else new_num_tokens
    if pad_to_multiple_of is not None:
        wanted = -(-wanted // pad_to_multiple_of) * pad_to_multiple_of
    if _built_on_meta(self) and wanted != current:
        raise RuntimeError(f"resize_token_embeddings({new_num_tokens}) on a model hf_zero built partitioned (meta "
                           "parameters, weights read at hf_zero.initialize): the new rows would need the old values. "
                           "Load the model whole (before the stage-3 TrainingArguments / Accelerator, outside "
                           "hf_zero.zero_init), resize it there, or resize once and save_pretrained the result, then "
                           "load that directory partitioned")
    return type(self).resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of, mean_resizing)


# ---- peft adapters loaded onto a meta-built model ------------------------------------------------
# ``PeftModel.from_pretrained(model, adapter)`` / ``load_adapter`` copy the adapter's tensors into
# the new LoRA parameters with ``load_state_dict``; on meta parameters that copy is a no-op (torch
# only warns), and initialize would then start the adapter from its initialisation. While the base
# model is meta-built, the state dict peft hands to ``load_state_dict`` (already in the model's
# parameter names) is kept in the model's weight plan, from which initialize reads it.
_ADAPTER_KEY = "\0hf_zero adapter:"


class AdapterValues:
    """A ``PretrainedWeights`` plan plus adapter tensors held in memory (adapters are small)."""

    def __init__(self, plan: Any, values: dict):
        self.plan, self.values = plan, values

    def key_for(self, name: str) -> Optional[str]:
        return _ADAPTER_KEY + name if name in self.values else self.plan.key_for(name)

    def read_into(self, key: str, start: int, out: Any) -> None:
        if not key.startswith(_ADAPTER_KEY):
            return self.plan.read_into(key, start, out)
        out.copy_(self.values[key[len(_ADAPTER_KEY):]].reshape(-1).narrow(0, start, out.numel()))

    def __getattr__(self, name: str) -> Any:   # the plan's report, counters, close()
        plan = self.__dict__.get("plan")
        if plan is None:   # during unpickling / copy, before __dict__ is filled
            raise AttributeError(name)
        return getattr(plan, name)

    def __deepcopy__(self, memo: dict) -> "AdapterValues":
        return self


def _watch_adapter_loading() -> None:
    try:
        from peft import PeftModel
    except ImportError:
        return
    original = PeftModel.load_adapter
    if getattr(original, "_hf_zero_patched", False):
        return

    def load_adapter(self: Any, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        from hf_zero.meta_init import has_meta_parameters

        plan = getattr(self, "_hf_zero_weights", None)
        if plan is None or not has_meta_parameters(self):
            return original(self, model_id, adapter_name, *args, **kwargs)
        loaded: dict = {}

        def load_state_dict(state_dict: dict, *a: Any, **kw: Any) -> Any:
            loaded.update(state_dict)
            with warnings.catch_warnings():   # torch's "copying ... to a meta parameter is a no-op": handled here
                warnings.filterwarnings("ignore", message=".*to a meta parameter in the current model")
                return type(self).load_state_dict(self, state_dict, *a, **kw)

        self.load_state_dict = load_state_dict   # this call only (peft calls it on this model)
        try:
            result = original(self, model_id, adapter_name, *args, **kwargs)
        finally:
            del self.load_state_dict
        params = dict(self.named_parameters())
        # every loaded adapter value is kept, also one peft assigned in place (low_cpu_mem_usage):
        # initialize rewrites every parameter from the source, so a value not kept would be lost
        values = {name: value.detach() for name, value in loaded.items() if name in params}
        if isinstance(plan, AdapterValues):
            plan.values.update(values)
        else:
            self.get_base_model()._hf_zero_weights = AdapterValues(plan, values)
        logger.info("hf_zero: adapter %s from %s: %d tensors kept for hf_zero.initialize", adapter_name, model_id,
                    len(values))
        return result

    setattr(load_adapter, "_hf_zero_patched", True)   # read above: patch once
    setattr(PeftModel, "load_adapter", load_adapter)
