"""Per-rank entry point of ``hf-zero launch``: make the stock ``Trainer`` and
``Accelerator.prepare`` train with hf_zero, then run the user's script unchanged.

``python -m hf_zero.integrations.bootstrap [--config CONFIG] script.py ARGS...`` (started by
torchrun or ``accelerate launch`` on every rank). The config is, in this order: ``--config``,
``HF_ZERO_CONFIG`` in the environment, or the script's own ``--deepspeed CONFIG`` flag.
``--deepspeed`` is always taken out of the script's arguments (transformers would import
the deepspeed package to honour it); ``HF_ZERO_CONFIG`` is then set for the patched classes.

- ``transformers.Trainer`` and ``transformers.trainer.Trainer`` are replaced by a subclass
  carrying :class:`HfZeroTrainerMixin`, so ``from transformers import Trainer`` in the script
  gets it; the mixin reads the config from the environment because the script's own
  ``TrainingArguments`` has no ``hf_zero`` field. Subclasses of ``Trainer`` created before
  the patch (``Seq2SeqTrainer``, TRL's trainers) are not changed: scripts using them need
  ``HfZeroTrainerMixin`` in their bases (see docs/integrations.md).
- ``accelerate.Accelerator.prepare`` shards the model it is given with its optimizer
  (accelerate.py's ``install_prepare_patch``).
- With a stage-3 config, ``from_pretrained`` builds models partitioned (meta parameters, each
  rank reading its slices at sharding) once the script's ``TrainingArguments`` exist, and,
  with accelerate's ``zero3_init_flag``, once its ``Accelerator`` exists: DeepSpeed's
  ``zero.Init`` contract (partitioned_load.py).
- guard.py checks that some model really was sharded (non-zero exit otherwise).
- fault.py: a survivor of a dead peer exits with an error naming the lost rank, and after a
  torchrun restart (``--max-restarts``) the Trainer resumes from the last complete checkpoint.
- Without CUDA, a multi-process rank gets ``ACCELERATE_USE_CPU=true`` (common.py's
  ``set_cpu_multiprocess``), so ``accelerate launch`` / ``torchrun`` of this module on a
  CPU machine form one gloo group as ``hf-zero launch`` does.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Optional

from hf_zero.integrations.common import (ALLOW_UNSHARDED_ENV, CONFIG_ENV, config_from_env, set_cpu_multiprocess,
                                        take_deepspeed_flag)

USAGE = "usage: python -m hf_zero.integrations.bootstrap [--config CONFIG] [--allow-unsharded] script.py [ARGS...]"


def install() -> type:
    """Patch ``transformers.Trainer`` (idempotent); returns the patched class."""
    import transformers
    import transformers.trainer

    from hf_zero.integrations.fault import ResumeAfterRestartMixin
    from hf_zero.integrations.trainer import HfZeroTrainerMixin

    original = transformers.trainer.Trainer
    if issubclass(original, HfZeroTrainerMixin):
        return original
    patched = type("Trainer", (ResumeAfterRestartMixin, HfZeroTrainerMixin, original),
                   {"__module__": original.__module__, "__doc__": original.__doc__})
    # Replaced by name in both modules (the classes' declared types do not allow it).
    setattr(transformers.trainer, "Trainer", patched)
    setattr(transformers, "Trainer", patched)
    return patched


def _own_options(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """(--config value or None, argv from the script on); --allow-unsharded sets its variable."""
    config = None
    while argv and argv[0].startswith("--"):
        option = argv.pop(0)
        if option == "--allow-unsharded":
            os.environ[ALLOW_UNSHARDED_ENV] = "1"
        elif option == "--config" and argv:
            config = argv.pop(0)
        elif option.startswith("--config="):
            config = option.split("=", 1)[1]
        else:
            raise SystemExit(f"hf_zero bootstrap: unknown option {option}\n{USAGE}")
    return config, argv


def resolve_config(explicit: Optional[str], script_args: list[str]) -> tuple[str, list[str]]:
    """(the config value for ``HF_ZERO_CONFIG``, the script's arguments without --deepspeed)."""
    script_args, deepspeed = take_deepspeed_flag(script_args)
    config = explicit or config_from_env() or deepspeed
    if config is None:
        raise SystemExit(f"hf_zero bootstrap: no config: pass --config CONFIG, set {CONFIG_ENV}, or give the "
                         f"script --deepspeed CONFIG")
    if deepspeed is not None and deepspeed != config:
        print(f"hf_zero bootstrap: the script's --deepspeed {deepspeed} is replaced by the hf_zero config "
              f"{config}", file=sys.stderr)
    if not config.lstrip().startswith("{") and os.path.exists(config):
        config = os.path.abspath(config)
    return config, script_args


def main(argv: list[str] | None = None) -> None:
    explicit, argv = _own_options(list(sys.argv[1:] if argv is None else argv))
    if not argv:
        raise SystemExit(USAGE)
    script = argv[0]
    try:
        config, script_args = resolve_config(explicit, argv[1:])
    except ValueError as err:
        raise SystemExit(f"hf_zero bootstrap: {err}") from None
    os.environ[CONFIG_ENV] = config
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # whichever launcher started this rank
        import torch

        set_cpu_multiprocess(os.environ, torch.cuda.is_available())
    from hf_zero.integrations import fault, guard
    from hf_zero.integrations.accelerate import install_prepare_patch
    from hf_zero.integrations.trainer import install_partitioned_loading

    fault.install()
    install()
    install_partitioned_loading()
    install_prepare_patch()
    guard.install()
    sys.argv = [script, *script_args]   # the script sees its own name and arguments, as if run directly
    sys.path[0] = os.path.dirname(os.path.abspath(script))   # as `python script.py` would set it
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:   # the script's own sys.exit(): a failure wins, success is checked
        if exit_.code not in (None, 0):
            raise
    except Exception as err:
        fault.reraise_naming_lost_rank(err)   # a dead peer: say which rank
        raise
    status = guard.check_at_exit()
    fault.stop()
    _destroy_process_group()
    if status:
        raise SystemExit(status)


def _destroy_process_group() -> None:
    """Tear down the script's process group before the interpreter exits. Left to interpreter
    shutdown, the backend's worker threads can be destroyed while still joinable, which
    aborts the rank ("terminate called without an active exception", SIGABRT) after the
    script itself succeeded; this launcher owns the process, so it cleans up (as torchrun
    scripts are told to)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
