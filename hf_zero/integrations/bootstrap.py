"""Per-rank entry point of ``hf-zero launch``: make the stock ``Trainer`` train with hf_zero,
then run the user's script unchanged.

``python -m hf_zero.integrations.bootstrap script.py ARGS...`` (started by torchrun or
``accelerate launch`` on every rank, with ``HF_ZERO_CONFIG`` in the environment).
``transformers.Trainer`` and ``transformers.trainer.Trainer`` are replaced by a subclass
carrying :class:`HfZeroTrainerMixin`, so ``from transformers import Trainer`` in the script
gets it; the mixin reads the config from the environment because the script's own
``TrainingArguments`` has no ``hf_zero`` field. Subclasses of ``Trainer`` created before
the patch (``Seq2SeqTrainer``, TRL's trainers) are not changed: scripts using them need
``HfZeroTrainerMixin`` in their bases (see docs/integrations.md).
"""

from __future__ import annotations

import os
import runpy
import sys

from hf_zero.integrations.common import CONFIG_ENV, config_from_env


def install() -> type:
    """Patch ``transformers.Trainer`` (idempotent); returns the patched class."""
    import transformers
    import transformers.trainer

    from hf_zero.integrations.trainer import HfZeroTrainerMixin

    original = transformers.trainer.Trainer
    if issubclass(original, HfZeroTrainerMixin):
        return original
    patched = type("Trainer", (HfZeroTrainerMixin, original), {"__module__": original.__module__,
                                                                "__doc__": original.__doc__})
    transformers.trainer.Trainer = patched
    transformers.Trainer = patched
    return patched


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m hf_zero.integrations.bootstrap script.py [ARGS...]")
    if config_from_env() is None:
        raise SystemExit(f"hf_zero bootstrap: {CONFIG_ENV} is not set (use `hf-zero launch --config CONFIG ...`)")
    install()
    script = argv[0]
    sys.argv = argv   # the script sees its own name and arguments, as if run directly
    sys.path[0] = os.path.dirname(os.path.abspath(script))   # as `python script.py` would set it
    runpy.run_path(script, run_name="__main__")
    _destroy_process_group()


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
