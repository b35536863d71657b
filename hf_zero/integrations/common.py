"""Glue the Trainer and accelerate adapters share: the environment switch, the step hooks
that keep the engine's counters and report current under a foreign loop, the gradient norm
those loops ask for, and the routing that makes accelerate pass the sharded objects through.

This is the only module of hf_zero that reads its environment variables (``HF_ZERO_CONFIG``,
``HF_ZERO_ALLOW_UNSHARDED``).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, MutableMapping, Optional, Union

if TYPE_CHECKING:
    from hf_zero.engine import ZeroEngine

CONFIG_ENV = "HF_ZERO_CONFIG"
"""Environment variable holding a config path or inline JSON; launchers pass it to every rank."""


ALLOW_UNSHARDED_ENV = "HF_ZERO_ALLOW_UNSHARDED"
"""Set to 1 to let a script under ``hf-zero launch`` train without any model sharded by hf_zero
(``hf-zero launch --allow-unsharded``); otherwise that is an error (see guard.py)."""

DEEPSPEED_FLAG = "--deepspeed"

ZERO3_INIT_ENV = "ACCELERATE_DEEPSPEED_ZERO3_INIT"
"""accelerate's own variable for ``zero3_init_flag`` (its launcher sets it from the yaml; so does
``hf-zero launch``): under hf_zero stage 3, models loaded after the ``Accelerator`` is created
are built partitioned (partitioned_load.py). Unlike accelerate, absent means off."""


def allow_unsharded() -> bool:
    return os.environ.get(ALLOW_UNSHARDED_ENV, "").strip().lower() not in ("", "0", "false", "no")


def take_deepspeed_flag(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """(argv without ``--deepspeed VALUE`` / ``--deepspeed=VALUE``, VALUE or None).

    transformers' ``TrainingArguments.__post_init__`` imports the deepspeed package as soon
    as the flag is set, so the bootstrap takes it out before the script parses its arguments
    and hands the value (a path or inline JSON, as transformers accepts) to hf_zero.
    """
    rest: list[str] = []
    value: Optional[str] = None
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == DEEPSPEED_FLAG:
            if index + 1 >= len(argv):
                raise ValueError("--deepspeed needs a value: a DeepSpeed config path or inline JSON")
            found, index = argv[index + 1], index + 2
        elif arg.startswith(DEEPSPEED_FLAG + "="):
            found, index = arg[len(DEEPSPEED_FLAG) + 1:], index + 1
        else:
            rest.append(arg)
            index += 1
            continue
        if value is not None and found != value:
            raise ValueError(f"--deepspeed is given twice with different values: {value!r} and {found!r}")
        value = found
    return rest, value


def set_cpu_multiprocess(env: MutableMapping[str, str], cuda: bool) -> None:
    """Without CUDA, make accelerate (and the Trainer, which builds its state through it) join
    the launcher's process group on CPU: a multi-process run under torchrun or accelerate's
    torchrun launcher otherwise becomes independent single processes on a CPU-only machine
    (PartialState only goes MULTI_CPU with ``cpu=True`` or ``ACCELERATE_USE_CPU``)."""
    if not cuda:
        env.setdefault("ACCELERATE_USE_CPU", "true")


def config_from_env() -> Optional[str]:
    """The hf_zero config named by ``HF_ZERO_CONFIG`` (a path or inline JSON), or None."""
    value = os.environ.get(CONFIG_ENV, "").strip()
    return value or None


def config_spec(explicit: Union[dict, str, None]) -> Union[dict, str, None]:
    """An explicitly given config wins over the environment."""
    return explicit if explicit not in (None, "") else config_from_env()


def zero3_init_requested() -> bool:
    return os.environ.get(ZERO3_INIT_ENV, "").strip().lower() in ("1", "true", "yes")


def config_stage(spec: Union[dict, str, None]) -> Optional[int]:
    """The ZeRO stage a config names, or None when it cannot be read (the Trainer / prepare
    report that error themselves, with the config's source)."""
    from hf_zero.config import read_config_dict

    try:
        raw, _ = read_config_dict(spec)
        return int((raw.get("zero_optimization") or {}).get("stage", 0))
    except Exception:   # noqa: BLE001 - any unreadable config: no partitioned loading, the error comes later
        return None


def build_partitioned_while(owner: Any, spec: Union[dict, str, None], what: str) -> None:
    """With a stage-3 config, ``from_pretrained`` builds models partitioned while ``owner``
    lives (DeepSpeed's ``zero.Init`` lifetime; partitioned_load.py's note)."""
    if spec is not None and config_stage(spec) == 3:
        from hf_zero.partitioned_load import activate_for

        activate_for(owner, f"{what} with a stage-3 hf_zero config")


def install_step_hooks(engine: "ZeroEngine") -> None:
    """Under a loop that calls ``engine.optimizer.step()`` itself, count steps (checkpoint tags,
    the per-step report) and time the optimizer phase as ``engine.step()`` would."""
    started: list[float] = []

    def before(optimizer: Any, args: Any, kwargs: Any) -> None:
        started.append(time.perf_counter())

    def after(optimizer: Any, args: Any, kwargs: Any) -> None:
        if engine.timers is not None and started:
            engine.timers.seconds["optimizer"] += time.perf_counter() - started.pop()
        started.clear()
        engine.count_optimizer_step()

    engine.optimizer.register_step_pre_hook(before)
    engine.optimizer.register_step_post_hook(after)


def time_forward_and_backward(accelerator: Any, engine: "ZeroEngine") -> None:
    """With ``wall_clock_breakdown``, time the forward (model hooks, training passes only, with
    tokens counted from ``input_ids``) and ``accelerator.backward``, which foreign loops run
    instead of ``engine(...)`` / ``engine.backward``. Install after ``scale_backward``."""
    import torch

    timers = engine.timers
    if timers is None:
        return
    started: list[float] = []

    def before_forward(module: Any, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            ids = kwargs.get("input_ids", args[0] if args else None)
            timers.tokens += ids.numel() if isinstance(ids, torch.Tensor) else 0
            started.append(time.perf_counter())

    def after_forward(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if started:
            timers.seconds["forward"] += time.perf_counter() - started.pop()

    engine.module.register_forward_pre_hook(before_forward, with_kwargs=True)
    engine.module.register_forward_hook(after_forward, with_kwargs=True)
    original = accelerator.backward

    def backward(loss: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        original(loss, **kwargs)
        timers.seconds["backward"] += time.perf_counter() - start

    accelerator.backward = backward


def current_grad_norm(engine: "ZeroEngine") -> float:
    """The global norm of the gradient accumulated so far (unscaled): what ``clip_grad_norm_``
    returns under the Trainer / accelerate. The clipping itself happens inside the step
    (``gradient_clipping``), which reuses this norm (ZeroOptimizer.grad_norm)."""
    return float(engine.optimizer.grad_norm().item())


def mark_prepared(engine: "ZeroEngine") -> None:
    """accelerate returns objects carrying this flag untouched from ``prepare`` (no DDP
    wrapper, no autocast patch), yet keeps tracking them; the model is already sharded.

    At stage 3 the modules that can ``generate`` are also marked as transformers marks
    FSDP2-sharded ones (``_is_fsdp_managed_module``): transformers reads it only to default
    ``generate(synced_gpus=...)`` to True on several ranks (generation/utils.py and speech
    models; trainer.py's other use needs a model sharded at load time by transformers), which
    stage 3 needs so that a rank that finishes early keeps joining the others' gathers.
    ``is_deepspeed_zero3_enabled()`` stays False: every other branch behind it calls the
    deepspeed package (docs/integrations.md)."""
    # Flags other libraries read, set on objects whose classes do not declare them.
    setattr(engine.module, "_is_accelerate_prepared", True)
    setattr(engine.optimizer, "_is_accelerate_prepared", True)
    if engine.config.zero_optimization.stage == 3:
        for module in engine.module.modules():
            if callable(getattr(module, "generate", None)):
                setattr(module, "_is_fsdp_managed_module", True)


def scale_backward(accelerator: Any, engine: "ZeroEngine") -> None:
    """fp16: multiply the loss by hf_zero's dynamic loss scale in ``accelerator.backward``
    (accelerate's own GradScaler is kept off; its step would never run on our optimizer)."""
    if not engine.scaler.dynamic and engine.scaler.scale == 1.0:
        return
    original = accelerator.backward

    def backward(loss: Any, **kwargs: Any) -> None:
        original(loss.float() * engine.scaler.scale, **kwargs)   # fp32: a scaled fp16 loss may overflow

    accelerator.backward = backward
