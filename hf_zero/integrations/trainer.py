"""The HF Trainer under hf_zero: ``ZeroTrainingArguments`` (``--hf_zero CONFIG``) and
``HfZeroTrainerMixin`` / ``HfZeroTrainer``.

[Note: Trainer integration]
The model is sharded in place when the Trainer creates its optimizer (``create_optimizer``,
called from ``_prepare_for_training`` before ``accelerator.prepare``). The engine's model
and optimizer carry ``_is_accelerate_prepared`` so accelerate passes them through (no DDP,
no autocast: hf_zero casts the model itself and owns fp16 loss scaling, so the accelerator
is built with ``mixed_precision="no"``). From then on the Trainer's own loop trains:
``loss.backward()`` reduces through hooks, ``no_sync`` and ``zero_grad`` are routed to the
engine, ``optimizer.step()`` is the ZeRO step. What the Trainer would do wrongly on private
shards is overridden: gradient norm and clipping, optimizer checkpoints (hf_zero sharded
checkpoints in ``checkpoint-N/hf_zero``, loadable on any world size), ``save_model`` (a
collective on every rank, then rank 0 writes HF safetensors, or the adapter for peft
models), loading the best model. Without a config (no ``--hf_zero`` and no
``HF_ZERO_CONFIG``) the mixin changes nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from transformers import Trainer, TrainingArguments

from hf_zero.integrations.auto_values import derived_from_hidden_size, hidden_size_of, resolve_auto
from hf_zero.integrations.common import (build_partitioned_while, config_spec, current_grad_norm,
                                         install_step_hooks, mark_prepared, scale_backward, time_forward_and_backward)

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "hf_zero"      # inside the Trainer's checkpoint-N directory
SCHEDULER_NAME = "scheduler.pt"    # the Trainer's own file name


@dataclass
class ZeroTrainingArguments(TrainingArguments):
    hf_zero: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "Train with hf_zero: path to a DeepSpeed-style JSON/YAML config, or inline JSON. "
                          "'auto' values are filled from these arguments."})

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["hf_zero"]

    def __post_init__(self) -> None:
        # A DeepSpeed user's `--deepspeed CONFIG` selects hf_zero with that config. It must move
        # before TrainingArguments.__post_init__, which imports the deepspeed package for it.
        if self.deepspeed:
            if self.hf_zero not in (None, "") and self.hf_zero != self.deepspeed:
                raise ValueError("--hf_zero and --deepspeed are both set to different configs; hf_zero replaces "
                                 "DeepSpeed: pass the config once (either flag)")
            self.hf_zero, self.deepspeed = self.deepspeed, None
        super().__post_init__()
        # As TrainingArguments(deepspeed=<stage 3>) does: from_pretrained builds partitioned from now on
        build_partitioned_while(self, config_spec(self.hf_zero), "ZeroTrainingArguments")


def install_partitioned_loading() -> None:
    """Under ``hf-zero launch``: any ``TrainingArguments`` (the script's own class, which has no
    ``hf_zero`` field) created with a stage-3 ``HF_ZERO_CONFIG`` makes ``from_pretrained`` build
    partitioned while it lives, as ``--deepspeed <stage 3>`` does (idempotent)."""
    original = TrainingArguments.__post_init__
    if getattr(original, "_hf_zero_patched", False):
        return

    def __post_init__(self: TrainingArguments) -> None:
        original(self)
        build_partitioned_while(self, config_spec(getattr(self, "hf_zero", None)), type(self).__name__)

    setattr(__post_init__, "_hf_zero_patched", True)   # read above: patch once
    setattr(TrainingArguments, "__post_init__", __post_init__)


def trainer_values(args: TrainingArguments, max_steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(matched, derived) values for auto_values.resolve_auto, as transformers fills DeepSpeed's."""
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    matched = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * args.world_size,
        "gradient_clipping": args.max_grad_norm,
        "fp16.enabled": bool(args.fp16),
        "bf16.enabled": bool(args.bf16),
        "optimizer.params.lr": args.learning_rate,
        "optimizer.params.betas": (args.adam_beta1, args.adam_beta2),
        "optimizer.params.eps": args.adam_epsilon,
        "optimizer.params.weight_decay": args.weight_decay,
    }
    derived = {
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_max_lr": args.learning_rate,
        "scheduler.params.warmup_num_steps": args.get_warmup_steps(max_steps),
        "scheduler.params.total_num_steps": max_steps,
    }
    return matched, derived


if TYPE_CHECKING:
    _TrainerBase = Trainer   # for the checker: the mixin overrides and calls Trainer's methods
else:
    _TrainerBase = object    # at run time a mixin, put before Trainer (or a subclass) in the bases


class HfZeroTrainerMixin(_TrainerBase):
    """Put before ``Trainer`` (or a subclass such as TRL's) in the bases: see the note above."""

    hf_zero_engine = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hf_zero_engine = None
        self._hf_zero_max_steps = max(1, self.args.max_steps)
        self._hf_zero_report_logged: Optional[dict] = None
        if self._hf_zero_spec() is not None:
            if getattr(self.args, "deepspeed", None):
                raise ValueError("--hf_zero and --deepspeed are both set; hf_zero replaces DeepSpeed: pass the "
                                 "DeepSpeed config as --hf_zero")
            self._hf_zero_config()   # fail on a bad config now, before data loading and training

    # ---- configuration --------------------------------------------------------------
    def _hf_zero_spec(self) -> Union[dict, str, None]:
        return config_spec(getattr(self.args, "hf_zero", None))

    def _hf_zero_config(self):
        matched, derived = trainer_values(self.args, self._hf_zero_max_steps)
        derived.update(derived_from_hidden_size(hidden_size_of(self.model)))
        return resolve_auto(self._hf_zero_spec(), matched, derived, "TrainingArguments")

    def _build_accelerator_args(self, **kwargs: Any) -> dict:
        args = super()._build_accelerator_args(**kwargs)
        if self._hf_zero_spec() is not None:
            args["mixed_precision"] = "no"   # hf_zero casts the model and scales fp16 losses itself
        return args

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any):
        self._hf_zero_max_steps = max_steps   # scheduler 'auto' values need the step count
        return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

    # ---- sharding -------------------------------------------------------------------
    def _move_model_to_device(self, model: Any, device: Any) -> None:
        from hf_zero.meta_init import has_meta_parameters

        if self._hf_zero_spec() is not None and has_meta_parameters(model):
            return   # built partitioned (meta): hf_zero.initialize places each rank's shards
        super()._move_model_to_device(model, device)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self._hf_zero_spec() is None:
            return super().create_optimizer(model)
        if self.hf_zero_engine is not None:
            return self.optimizer
        import hf_zero

        config = self._hf_zero_config()
        # DeepSpeed's rule: the config's optimizer wins; otherwise the Trainer's (with its
        # weight-decay groups) is rebound to hf_zero's master shards.
        optimizer = super().create_optimizer(model) if config.optimizer is None else None
        assert self.model is not None   # the Trainer creates its optimizer for a model it holds
        engine = hf_zero.initialize(self.model, config, optimizer=optimizer)
        self.hf_zero_engine = engine
        self.optimizer = engine.optimizer
        if engine.lr_scheduler is not None:   # the config's scheduler wins too
            self.lr_scheduler = engine.lr_scheduler
        mark_prepared(engine)
        install_step_hooks(engine)
        scale_backward(self.accelerator, engine)
        time_forward_and_backward(self.accelerator, engine)
        return self.optimizer

    # ---- gradient norm: the default reads local .grad, wrong for partitioned gradients --------
    def _clip_grad_norm(self, model: Any) -> Any:
        if self.hf_zero_engine is None:
            return super()._clip_grad_norm(model)
        return current_grad_norm(self.hf_zero_engine)   # the step clips with gradient_clipping

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        if self.hf_zero_engine is None:
            return super()._get_grad_norm(model, grad_norm)
        return grad_norm if grad_norm is not None else current_grad_norm(self.hf_zero_engine)

    # ---- logging: the engine's per-step report joins the Trainer's logs --------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        engine = self.hf_zero_engine
        report = engine.last_report if engine is not None else None
        if report and report is not self._hf_zero_report_logged and "loss" in logs:
            logs.update({f"hf_zero/{key}": float(value) for key, value in report.items()})
            self._hf_zero_report_logged = report
        super().log(logs, *args, **kwargs)

    # ---- saving -----------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        engine = self.hf_zero_engine
        if engine is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        assert output_dir is not None   # TrainingArguments.__post_init__ fills a default output_dir
        # Every rank takes part (stage 3 gathers); rank 0 writes. Trainer._save would return
        # early on the other ranks and leave rank 0 alone in the gather.
        engine.save_16bit_model(output_dir, dtype=engine.dtype)
        if self.args.should_save:
            generation = getattr(self.model, "generation_config", None)
            if generation is not None and not os.path.exists(os.path.join(output_dir, "generation_config.json")):
                generation.save_pretrained(output_dir)   # stage 3's shard-by-shard export writes config.json only
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        engine = self.hf_zero_engine
        if engine is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        engine.save_checkpoint(os.path.join(output_dir, CHECKPOINT_SUBDIR), tag=f"global_step{self.state.global_step}")
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    # ---- loading ----------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._hf_zero_spec() is not None and os.path.isdir(os.path.join(resume_from_checkpoint, CHECKPOINT_SUBDIR)):
            return   # the engine restores exact fp32 masters after sharding (_load_optimizer_and_scheduler)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        engine = self.hf_zero_engine
        if engine is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        engine.load_checkpoint(os.path.join(checkpoint, CHECKPOINT_SUBDIR))   # any world size or stage
        path = os.path.join(checkpoint, SCHEDULER_NAME)
        if self.lr_scheduler is not None and os.path.isfile(path):
            self.lr_scheduler.load_state_dict(torch.load(path, weights_only=True))

    def _load_best_model(self) -> None:
        engine = self.hf_zero_engine
        if engine is None:
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        assert best is not None   # the Trainer calls this only when there is a best checkpoint
        logger.info("hf_zero: loading the best model from %s", best)
        engine.load_checkpoint(os.path.join(best, CHECKPOINT_SUBDIR), load_module_only=True)


class HfZeroTrainer(HfZeroTrainerMixin, Trainer):
    """``transformers.Trainer`` training with hf_zero when a config is given."""
