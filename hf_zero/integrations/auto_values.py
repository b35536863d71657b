"""Fill a config's ``"auto"`` values from the training framework, as transformers does for DeepSpeed.

[Note: auto resolution]
Two kinds of keys (dotted DeepSpeed paths):

- *matched* keys mirror a setting the training loop itself uses (batch sizes, accumulation,
  clipping, precision, optimizer hyperparameters). ``"auto"`` or absent -> the framework's
  value; an explicit value that differs is a contradiction, and all of them are reported
  together in one :class:`ConfigError`. Absent counts as ``"auto"`` because a silent default
  (say ``gradient_accumulation_steps`` 1 while the Trainer accumulates 4) would train wrong.
  Optimizer and scheduler keys are only considered when their section is present: without
  one, the framework's own optimizer / scheduler is used and nothing needs matching.
- *derived* keys (bucket sizes from the model's hidden size h, scheduler step counts) are
  filled only where ``"auto"``; explicit values win without complaint.

Everything here works on the raw dict, before defaults are applied, so "absent" is visible.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

from hf_zero.config import AUTO, ConfigError, HfZeroConfig, load_config, read_config_dict

_MISSING = object()
_OPTIONAL_SECTIONS = ("optimizer", "scheduler")   # matched only when the user wrote the section


def hidden_size_of(model: Any) -> Optional[int]:
    """The model's hidden size (``config.hidden_size``, or the largest of ``hidden_sizes``)."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    if config is None:
        return None
    size = getattr(config, "hidden_size", None)
    if isinstance(size, int):
        return size
    sizes = getattr(config, "hidden_sizes", None)
    return max(sizes) if sizes else None


def derived_from_hidden_size(hidden: Optional[int]) -> dict[str, int]:
    """transformers' DeepSpeed bucket sizes for hidden size h (empty when h is unknown)."""
    if not hidden:
        return {}
    return {"zero_optimization.reduce_bucket_size": hidden * hidden,
            "zero_optimization.allgather_bucket_size": hidden * hidden,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden}


def _get(data: dict, path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(data: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _same(current: Any, wanted: Any) -> bool:
    if isinstance(wanted, (tuple, list)):
        return (isinstance(current, (tuple, list)) and len(current) == len(wanted)
                and all(_same(c, w) for c, w in zip(current, wanted)))
    if isinstance(wanted, bool) or isinstance(current, bool):
        return bool(current) == bool(wanted) and isinstance(current, bool)
    if isinstance(wanted, (int, float)) and isinstance(current, (int, float)):
        return math.isclose(float(current), float(wanted), rel_tol=1e-9, abs_tol=0.0)
    return current == wanted


def _autos_left(data: Any, prefix: str = "") -> list[str]:
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in _autos_left(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if data == AUTO else []


def _optimizer_takes(data: dict, key: str) -> bool:
    """Whether an absent ``optimizer.params.X`` should take the framework's value: X is a
    parameter of the config's optimizer type, and for betas / eps (TrainingArguments' Adam
    ones) the type is Adam-like; Lion, Adagrad and Muon keep their own defaults."""
    from hf_zero.config.compat import OPTIMIZER_PARAMS

    if not key.startswith("optimizer.params."):
        return True
    kind = _get(data, "optimizer.type")
    kind = kind if isinstance(kind, str) else "AdamW"
    name = key.rsplit(".", 1)[1]
    if name in ("betas", "eps") and kind.lower() not in ("adam", "adamw", "onebitadam", "zerooneadam", "lamb",
                                                          "onebitlamb"):
        return False
    allowed = OPTIMIZER_PARAMS.get(kind)
    return allowed is None or name in allowed


def resolve_auto(config: Union[dict, str, None], matched: dict[str, Any], derived: dict[str, Any],
                 source: str, defaults: Optional[dict[str, Any]] = None) -> HfZeroConfig:
    """Return the validated config with every ``"auto"`` filled (see the note above).

    ``matched`` / ``derived``: dotted key -> the framework's value; ``defaults``: filled where
    absent or ``"auto"``, never checked; ``source`` names the framework in error messages
    (e.g. ``"TrainingArguments"``).
    """
    if isinstance(config, HfZeroConfig):
        raise TypeError("resolve_auto needs the raw config (dict, path or inline JSON), not a parsed HfZeroConfig")
    data, where = read_config_dict(config)
    problems: list[tuple[str, str]] = []
    for key, wanted in matched.items():
        section = key.split(".")[0]
        if section in _OPTIONAL_SECTIONS and not isinstance(data.get(section), dict):
            continue
        current = _get(data, key)
        if current is _MISSING and not _optimizer_takes(data, key):
            continue   # e.g. no Adam epsilon for a Lion built from the config
        if current is _MISSING or current == AUTO:
            _set(data, key, list(wanted) if isinstance(wanted, tuple) else wanted)
        elif not _same(current, wanted):
            problems.append((key, f"is {current!r} but {source} says {wanted!r}; set it to \"auto\" "
                                  f"or make them agree"))
    for key, value in derived.items():
        if _get(data, key) == AUTO:
            _set(data, key, value)
    for key, value in (defaults or {}).items():
        if _get(data, key) in (AUTO, _MISSING):
            _set(data, key, value)
    left = _autos_left(data)
    problems += [(key, f"is 'auto' but {source} gives nothing to fill it from; set a value") for key in left]
    try:   # unknown keys and bad values join the contradictions in the one error
        resolved = load_config(data)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems, where)
    return resolved
