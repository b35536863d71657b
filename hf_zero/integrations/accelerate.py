"""An accelerate training loop under hf_zero: one call before ``accelerator.prepare``.

```python
model, optimizer = hf_zero.prepare_accelerate(accelerator, model, optimizer)   # the added line
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
```

[Note: accelerate integration]
accelerate cannot be extended by registration (closed ``DistributedType``, unknown yaml keys
rejected), so the model is sharded in place *before* ``prepare`` and both objects carry
``_is_accelerate_prepared``: ``prepare`` returns them untouched (no DDP wrapper) yet tracks
them. What accelerate would then do wrongly on private shards is routed on this
accelerator instance only:

- ``optimizer.step`` / ``optimizer.zero_grad`` do nothing on micro-steps where
  ``accelerator.sync_gradients`` is false (what accelerate's optimizer wrapper would do;
  the wrapper itself cannot be used: it re-loads the optimizer's state dict).
- ``backward``: accelerate divides by its accumulation steps; hf_zero multiplies by its fp16
  loss scale (accelerate's GradScaler is switched off: its step never runs on our optimizer).
- ``clip_grad_norm_`` on the model's parameters: returns the global norm and makes the next
  optimizer step clip to ``max_norm`` (clipping happens on the partitioned gradients).
- ``get_state_dict``: full tensors under the in-memory names, as ``model.state_dict()`` of an
  unsharded model (stage 3 gathers one group at a time into host copies; every rank must call
  it, a call on some ranks only raises there after ``presence_timeout``). So the idiom
  ``unwrap_model(model).save_pretrained(out, state_dict=accelerator.get_state_dict(model))``
  works: transformers' save_pretrained reverts its load-time conversions itself.
- ``save_model(model, dir, max_shard_size)`` of a transformers model: save_pretrained's layout
  (tied duplicates dropped, load-time conversions reverted, e.g. per-expert MoE keys, its shard
  plan and index naming, ``config.json`` / ``generation_config.json``) through hf_zero's export
  (checkpoint/export.py), gathering one output file at a time; every rank calls it, the main
  process writes (each node's with ``save_on_each_node``). Not accelerate's own layout, whose
  in-memory names ``from_pretrained`` reads but other HF readers may not. Plain ``nn.Module``s,
  peft models and ``safe_serialization=False`` keep accelerate's ``save_model`` (full tensors
  from ``get_state_dict``).
- ``save_state`` / ``load_state``: a pre-hook writes / reads an hf_zero sharded checkpoint in
  ``<dir>/hf_zero`` (any world size); accelerate's own model file is skipped (and the model is
  not gathered for it: ``get_state_dict`` returns ``{}`` inside ``save_state``) and its
  optimizer file holds only a marker (its default would save rank 0's shard only).
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Any, Optional, Union

import torch

from hf_zero.integrations.auto_values import derived_from_hidden_size, hidden_size_of, resolve_auto
from hf_zero.integrations.common import (build_partitioned_while, config_spec, current_grad_norm,
                                         install_step_hooks, mark_prepared, scale_backward, time_forward_and_backward,
                                         zero3_init_requested)

CHECKPOINT_SUBDIR = "hf_zero"
_OPTIMIZER_MARKER = "hf_zero: optimizer state is in the hf_zero/ checkpoint beside this file"


def accelerate_values(accelerator: Any, micro_batch_size: Optional[int], raw: dict) -> tuple[dict, dict, dict]:
    """(matched, derived, defaults) for auto_values.resolve_auto from an ``Accelerator``."""
    accum = accelerator.gradient_accumulation_steps
    precision = str(accelerator.mixed_precision)
    matched: dict[str, Any] = {"gradient_accumulation_steps": accum, "fp16.enabled": precision == "fp16",
                               "bf16.enabled": precision == "bf16"}
    # Absent or "auto": clip only where the script calls accelerator.clip_grad_norm_ (which
    # sets the step's max_norm), as a plain accelerate loop does; an explicit value clips every step.
    defaults: dict[str, Any] = {"gradient_clipping": 0.0}
    if micro_batch_size is not None:
        matched["train_micro_batch_size_per_gpu"] = micro_batch_size
        matched["train_batch_size"] = micro_batch_size * accum * accelerator.num_processes
    elif raw.get("train_batch_size") in (None, "auto"):
        # The batch keys are informational in this loop (accelerate feeds the batches);
        # DeepSpeed's invariant still needs one of them.
        defaults.update(train_micro_batch_size_per_gpu=1, train_batch_size=accum * accelerator.num_processes)
    return matched, {}, defaults


def prepare_accelerate(accelerator: Any, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                       config: Union[dict, str, None] = None, micro_batch_size: Optional[int] = None):
    """Shard ``model`` with hf_zero for this accelerate loop; returns ``(model, optimizer)``.

    ``config``: hf_zero config (dict, path or inline JSON); default ``HF_ZERO_CONFIG``.
    ``optimizer``: the loop's elementwise optimizer, built before this call and never stepped
    (rebound to hf_zero's master shards); omit it to build one from the config's ``optimizer``.
    """
    import hf_zero
    from hf_zero.config import ConfigError, read_config_dict

    engine = getattr(accelerator, "hf_zero_engine", None)
    if engine is not None and engine.module is model:   # already sharded (e.g. by the patched prepare)
        return engine.module, engine.optimizer
    spec = config_spec(config)
    if spec is None:
        raise ValueError("hf_zero.prepare_accelerate: no hf_zero config; pass config= or set HF_ZERO_CONFIG "
                         "(`hf-zero launch` does)")
    raw, _ = read_config_dict(spec)
    if optimizer is not None and isinstance(raw.get("optimizer"), dict):
        raise ConfigError([("optimizer", "the training loop passes its own optimizer; remove this section "
                                         "or pass optimizer=None")])
    matched, derived, defaults = accelerate_values(accelerator, micro_batch_size, raw)
    derived.update(derived_from_hidden_size(hidden_size_of(model)))
    resolved = resolve_auto(spec, matched, derived, "the Accelerator", defaults)
    engine = hf_zero.initialize(model, resolved, optimizer=optimizer)
    mark_prepared(engine)
    # accelerate pairs a scheduler with its optimizer through ``prepared.optimizer``
    setattr(engine.optimizer, "optimizer", engine.optimizer)
    install_step_hooks(engine)
    _step_config_scheduler(engine)
    accelerator.scaler = None   # hf_zero owns fp16 loss scaling (see the note)
    scale_backward(accelerator, engine)
    time_forward_and_backward(accelerator, engine)
    _gate_on_sync(accelerator, engine)
    _route_clipping(accelerator, engine)
    _route_state_dict(accelerator, engine)
    _route_save_model(accelerator, engine)
    _route_save_and_load(accelerator, engine)
    accelerator.hf_zero_engine = engine
    return engine.module, engine.optimizer


def _step_config_scheduler(engine: Any) -> None:
    """A config ``scheduler`` section: the loop never sees that scheduler, so it is stepped after
    every optimizer step that was not skipped, as DeepSpeed's engine steps its own scheduler
    under accelerate (whose DeepSpeedSchedulerWrapper.step does nothing)."""
    scheduler = engine.lr_scheduler
    if scheduler is None:
        return

    def step_schedule(optimizer: Any, args: Any, kwargs: Any) -> None:
        if not engine.optimizer.step_was_skipped:
            with warnings.catch_warnings():   # torch's order check sees _gate_on_sync's step: we are after it
                warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
                scheduler.step()

    engine.optimizer.register_step_post_hook(step_schedule)


def _gate_on_sync(accelerator: Any, engine: Any) -> None:
    optimizer = engine.optimizer
    step, zero_grad = optimizer.step, optimizer.zero_grad   # bound: torch's step hooks still fire

    def gated_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        return step(*args, **kwargs) if accelerator.sync_gradients else None

    def gated_zero_grad(self: Any, set_to_none: bool = True) -> None:
        if accelerator.sync_gradients:   # keep the gradients accumulated so far
            zero_grad(set_to_none)

    # bound methods: LR schedulers wrap ``optimizer.step`` through its ``__func__``
    optimizer.step = types.MethodType(gated_step, optimizer)
    optimizer.zero_grad = types.MethodType(gated_zero_grad, optimizer)


def _route_clipping(accelerator: Any, engine: Any) -> None:
    original = accelerator.clip_grad_norm_
    owned = {id(p) for p in engine.module.parameters()}
    default_clip = engine.optimizer.gradient_clipping

    def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2) -> torch.Tensor:
        parameters = list(parameters)
        if not any(id(p) in owned for p in parameters):
            return original(parameters, max_norm, norm_type)
        if float(norm_type) != 2.0:
            raise ValueError(f"hf_zero clips the global 2-norm only, got norm_type={norm_type}")
        engine.optimizer.gradient_clipping = float(max_norm)   # applied by the next step, then reset
        return torch.tensor(current_grad_norm(engine))

    def reset_clip(optimizer: Any, args: Any, kwargs: Any) -> None:
        engine.optimizer.gradient_clipping = default_clip

    engine.optimizer.register_step_post_hook(reset_clip)
    accelerator.clip_grad_norm_ = clip_grad_norm_


def _route_state_dict(accelerator: Any, engine: Any) -> None:
    from hf_zero.checkpoint.model_hooks import GATHER_INSTEAD
    from hf_zero.presence import all_ranks_call

    original, original_save_state = accelerator.get_state_dict, accelerator.save_state
    in_save_state = [False]

    def save_state(*args: Any, **kwargs: Any) -> Any:
        in_save_state[0] = True
        try:
            return original_save_state(*args, **kwargs)
        finally:
            in_save_state[0] = False

    def get_state_dict(model: Any, unwrap: bool = True) -> dict:
        if model is not engine.module:
            return original(model, unwrap)
        if in_save_state[0] and not unwrap:
            # save_state's own call: the save hook writes hf_zero's sharded checkpoint and drops
            # this entry, so gathering the whole model into host memory here would be wasted
            return {}
        if engine.zero_optimization_stage() != 3:
            return engine.module.state_dict()   # whole parameters: rank 0 alone may ask, as under DDP
        # Stage 3: state_dict() gathers one group at a time into host copies (checkpoint/model_hooks.py);
        # in-memory names, as accelerate returns under DDP (save_pretrained(state_dict=...) reverts them).
        # accelerator.save_model reaches this for models _route_save_model leaves to accelerate.
        with all_ranks_call(engine.comm, "accelerator.get_state_dict(model) / accelerator.save_model(model)",
                            GATHER_INSTEAD):
            return engine.module.state_dict()

    accelerator.get_state_dict = get_state_dict
    accelerator.save_state = save_state
    optimizer = engine.optimizer
    optimizer.state_dict = lambda: {"hf_zero": _OPTIMIZER_MARKER}

    def load_state_dict(state: dict) -> None:
        if state.get("hf_zero") != _OPTIMIZER_MARKER:
            raise ValueError("this optimizer state was not saved by hf_zero's accelerate integration; "
                             "hf_zero restores its optimizer from the hf_zero/ checkpoint")

    optimizer.load_state_dict = load_state_dict


def _route_save_model(accelerator: Any, engine: Any) -> None:
    from hf_zero.checkpoint.export import save_model_hf
    from hf_zero.checkpoint.hf_layout import is_transformers_model
    from hf_zero.checkpoint.model_hooks import GATHER_INSTEAD
    from hf_zero.presence import all_ranks_call

    original = accelerator.save_model

    def save_model(model: torch.nn.Module, save_directory: Union[str, os.PathLike],
                   max_shard_size: Union[int, str] = "10GB", safe_serialization: bool = True) -> None:
        module = accelerator.unwrap_model(model)
        if (module is not engine.module or not is_transformers_model(module) or not safe_serialization
                or getattr(module, "peft_config", None) is not None or os.path.isfile(save_directory)):
            # accelerate's own layout (a file path: accelerate logs its error and writes nothing)
            return original(model, save_directory, max_shard_size=max_shard_size,
                            safe_serialization=safe_serialization)
        on_each_node = accelerator.project_configuration.save_on_each_node
        writer = accelerator.is_local_main_process if on_each_node else accelerator.is_main_process
        # the outer presence check names this call; save_model_hf's own check is then skipped (nested)
        with all_ranks_call(engine.comm, "accelerator.save_model(model)", GATHER_INSTEAD):
            save_model_hf(module, os.fspath(save_directory), engine.dtype, is_writer=writer,
                          max_shard_size=max_shard_size, comm=engine.comm)
        engine.comm.barrier()   # the files are complete on every rank's return, as save_16bit_model
        return None

    accelerator.save_model = save_model


def _route_save_and_load(accelerator: Any, engine: Any) -> None:
    def save_hook(models: list, weights: list, output_dir: str) -> None:
        engine.save_checkpoint(os.path.join(output_dir, CHECKPOINT_SUBDIR))
        for index, model in enumerate(models):
            if model is engine.module and index < len(weights):
                weights.pop(index)   # the checkpoint holds the weights; keeps load-side indices aligned
                break

    def load_hook(models: list, input_dir: str) -> None:
        if engine.module in models:
            models.remove(engine.module)   # a local list: accelerate then skips loading this model
        engine.load_checkpoint(os.path.join(input_dir, CHECKPOINT_SUBDIR))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---- unmodified scripts: Accelerator.prepare shards by itself (installed by the bootstrap) ----
def install_prepare_patch() -> None:
    """Make ``Accelerator.prepare`` call :func:`prepare_accelerate` on the model and optimizer
    it is given, when a config is in ``HF_ZERO_CONFIG`` (idempotent; a no-op without
    accelerate). Objects already sharded (``prepare_accelerate`` called by the script, or
    the Trainer's model) pass through, so calling both is harmless."""
    try:
        from accelerate import Accelerator
    except ImportError:
        return
    original = Accelerator.prepare
    if getattr(original, "_hf_zero_patched", False):
        return

    def prepare(self: Any, *args: Any, device_placement: Any = None) -> Any:
        if config_spec(None) is not None:
            args = _shard_in_prepare(self, args)
        return original(self, *args, device_placement=device_placement)

    setattr(prepare, "_hf_zero_patched", True)   # read above: patch once
    prepare.__doc__ = original.__doc__
    Accelerator.prepare = prepare
    _build_partitioned_after_accelerator(Accelerator)


def _build_partitioned_after_accelerator(accelerator_class: type) -> None:
    """accelerate's ``zero3_init_flag`` (``ACCELERATE_DEEPSPEED_ZERO3_INIT``): with a stage-3
    config, ``from_pretrained`` builds models partitioned while the ``Accelerator`` lives, as
    its DeepSpeed plugin's ``HfDeepSpeedConfig`` makes transformers do (partitioned_load.py)."""
    original = accelerator_class.__dict__["__init__"]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if zero3_init_requested():
            build_partitioned_while(self, config_spec(None), "Accelerator(zero3_init_flag)")

    __init__.__doc__ = original.__doc__
    setattr(accelerator_class, "__init__", __init__)


def _shard_in_prepare(accelerator: Any, args: tuple) -> tuple:
    """``args`` with the trainable model and its optimizer replaced by hf_zero's (the same
    module object, sharded in place, and the engine's optimizer)."""
    models = [a for a in args if isinstance(a, torch.nn.Module) and not getattr(a, "_is_accelerate_prepared", False)
              and any(p.requires_grad for p in a.parameters())]
    if not models:
        return args   # nothing trainable here (a data loader, a frozen reference model) or already sharded
    if len(models) > 1 or getattr(accelerator, "hf_zero_engine", None) is not None:
        raise ValueError("hf_zero: Accelerator.prepare got a second trainable model; hf_zero shards one model per "
                         "Accelerator by itself. Call hf_zero.prepare_accelerate / hf_zero.initialize for the "
                         "others explicitly")
    model = models[0]
    optimizers = [a for a in args if isinstance(a, torch.optim.Optimizer)]
    if len(optimizers) > 1:
        raise ValueError("hf_zero: Accelerator.prepare got several optimizers; pass the model's one")
    if not optimizers:
        raise ValueError("hf_zero: Accelerator.prepare got a trainable model without its optimizer; hf_zero shards a "
                         "model together with its optimizer: pass both to the same prepare call "
                         "(accelerator.prepare(model, optimizer, ...)), or call hf_zero.prepare_accelerate first")
    optimizer = optimizers[0]
    loaders = [a for a in args if isinstance(a, torch.utils.data.DataLoader) and a.batch_size]
    micro = loaders[0].batch_size if loaders else None   # what accelerate reads for DeepSpeed, too
    sharded, engine_optimizer = prepare_accelerate(accelerator, model, optimizer, micro_batch_size=micro)
    return tuple(sharded if a is model else engine_optimizer if a is optimizer else a for a in args)
