"""Build an :class:`HfZeroConfig` from a DeepSpeed-style dict, validating every key.

All problems found in one pass are reported together in a single :class:`ConfigError`,
each naming its dotted key path (``zero_optimization.stage``), with a did-you-mean for
unknown keys. Nothing here touches torch or a process group.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Union

from hf_zero.config.batch import check_batch_invariant_static
from hf_zero.config.compat import (Unhonoured, check_optimizer_params, check_unhonoured, find_unhonoured,
                                   normalise_aliases)
from hf_zero.config.schema import AUTO, IGNORED_DEEPSPEED_KEYS, HfZeroConfig


class ConfigError(ValueError):
    """Invalid hf_zero / DeepSpeed configuration. ``problems`` lists (key_path, message)."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = [f"  {key}: {msg}" for key, msg in problems]
        super().__init__(f"invalid hf_zero config{where}:\n" + "\n".join(lines))


def load_config(config: Union["HfZeroConfig", dict, str, os.PathLike, None] = None,
                **overrides: Any) -> HfZeroConfig:
    """Return a validated config from a config object, a dict, a JSON/YAML path or inline JSON.

    ``overrides`` are top-level keys (``gradient_clipping=0.5``) applied on top.
    """
    validated = False
    if isinstance(config, HfZeroConfig):   # its keys were reported when it was loaded
        if not overrides:
            return config
        config = config_to_dict(config)
        validated = True
    data, source = read_config_dict(config)
    data.update(overrides)
    # A config object's dict form holds every parameter of every optimizer type: its optimizer
    # params were checked against the type when it was loaded.
    result, notes = _validate(data, source, check_params=not validated)
    for note in [] if validated else notes:   # one warning per key ([Note: unhonoured DeepSpeed keys] in compat.py)
        warnings.warn(f"hf_zero does not honour DeepSpeed key '{note.key}': {note.instead}", stacklevel=3)
    return result


def unhonoured_keys(config: Union[dict, str, os.PathLike]) -> list[Unhonoured]:
    """The keys of a DeepSpeed-style config that hf_zero accepts without honouring them
    (what ``hf-zero check-config`` lists); raises ConfigError if the config is invalid."""
    data, source = read_config_dict(config)
    return _validate(data, source, enforce_opt_in=False)[1]


def _validate(data: dict, source: str | None, enforce_opt_in: bool = True,
              check_params: bool = True) -> tuple[HfZeroConfig, list[Unhonoured]]:
    problems: list[tuple[str, str]] = []
    result = _build(HfZeroConfig, data, "", problems)
    if check_params:
        problems.extend(check_optimizer_params(data))
    notes = find_unhonoured(data)
    if not problems:
        problems.extend(check_batch_invariant_static(result))
        if enforce_opt_in:
            problems.extend(check_unhonoured(notes, result))
        if result.fp16.enabled is True and result.bf16.enabled is True:
            problems.append(("bf16.enabled", "fp16 and bf16 cannot both be enabled: fp16.enabled and bf16.enabled "
                                             "are both true (DeepSpeed refuses it too); set one to false"))
    if problems:
        raise ConfigError(problems, source)
    return result, notes


def read_config_dict(config: Union[dict, str, os.PathLike, None]) -> tuple[dict, str | None]:
    """The raw DeepSpeed-style dict (a copy, unvalidated, absent keys still absent) from a dict,
    a JSON/YAML path or inline JSON, and a name for its source. Integrations read it to tell
    keys the user left out from keys set to their defaults."""
    data, source = _read_raw(config)
    # DeepSpeed's alternative spellings become hf_zero's keys here, so integrations filling
    # "auto" values see one name per key (compat.py).
    problems: list[tuple[str, str]] = []
    data = normalise_aliases(data, problems)
    if problems:
        raise ConfigError(problems, source)
    return data, source


def _read_raw(config: Union[dict, str, os.PathLike, None]) -> tuple[dict, str | None]:
    if config is None:
        return {}, None
    if isinstance(config, dict):
        return copy.deepcopy(config), None
    if isinstance(config, (str, os.PathLike)):
        text = str(config)
        if text.lstrip().startswith("{"):
            return _loads_json(text, "inline JSON"), "inline JSON"
        return _read_file(Path(text)), text
    raise TypeError(f"config must be a dict, a path or an HfZeroConfig, got {type(config).__name__}")


def config_to_dict(config: HfZeroConfig) -> dict:
    """The DeepSpeed-style dict form (JSON-serialisable) of a config."""
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return list(value)
        return value
    return convert(config)


def _loads_json(text: str, source: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError([("<root>", f"not valid JSON: {err}")], source) from None
    if not isinstance(data, dict):
        raise ConfigError([("<root>", "expected a JSON object")], source)
    return data


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"hf_zero config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # optional: only needed for YAML configs

        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ConfigError([("<root>", "expected a mapping")], str(path))
        return data
    return _loads_json(text, str(path))


def _build(cls: type, data: Any, prefix: str, problems: list[tuple[str, str]]) -> Any:
    if not isinstance(data, dict):
        problems.append((prefix.rstrip(".") or "<root>", f"expected an object, got {_describe(data)}"))
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            if path in IGNORED_DEEPSPEED_KEYS or key in IGNORED_DEEPSPEED_KEYS:
                continue   # reported by compat.find_unhonoured
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            problems.append((path, f"unknown key{hint}"))
            continue
        kwargs[key] = _convert(hints[key], fields[key], value, path, problems)
    try:
        return cls(**kwargs)
    except TypeError as err:  # only reachable if a conversion above failed
        problems.append((prefix or "<root>", str(err)))
        return cls()


def _convert(hint: Any, fld: dataclasses.Field, value: Any, path: str,
             problems: list[tuple[str, str]]) -> Any:
    meta = fld.metadata
    options = _union_members(hint)
    if value is None:
        if type(None) in options:
            return None
        problems.append((path, "must not be null"))
        return fld.default
    if isinstance(value, str) and value == AUTO:
        if meta.get("auto") or AUTO in meta.get("choices", ()):   # fused_kernels: "auto" is a choice
            return AUTO
        problems.append((path, "'auto' is not allowed for this key"))
        return fld.default
    nested = [t for t in options if isinstance(t, type) and dataclasses.is_dataclass(t)]
    if nested:
        return _build(nested[0], value, path + ".", problems)
    kind = next((t for t in (bool, int, float, tuple, str) if t in options), None)
    converted, error = _coerce(kind, value)
    if error:
        problems.append((path, error))
        return fld.default
    error = _check_bounds(converted, meta)
    if error:
        problems.append((path, error))
        return fld.default
    return converted


def _coerce(kind: Any, value: Any) -> tuple[Any, str | None]:
    if kind is bool:
        if isinstance(value, bool):
            return value, None
        return None, f"expected true/false, got {_describe(value)}"
    if kind is int:
        # JSON writes 2e8 as a float; DeepSpeed accepts integral floats for element counts.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"expected an integer, got {_describe(value)}"
        if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
            return None, f"expected an integer, got {value!r}"
        return int(value), None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"expected a number, got {_describe(value)}"
        if not math.isfinite(value):
            return None, f"expected a finite number, got {value!r}"
        return float(value), None
    if kind is tuple:
        ok = (isinstance(value, (list, tuple)) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        if not ok:
            return None, f"expected a pair of numbers, got {_describe(value)}"
        if not all(0.0 <= v < 1.0 for v in value):
            return None, f"each value must be in [0, 1), got {list(value)}"
        return (float(value[0]), float(value[1])), None
    if kind is str:
        if not isinstance(value, str):
            return None, f"expected a string, got {_describe(value)}"
        return value, None
    return None, f"unsupported value {_describe(value)}"


def _check_bounds(value: Any, meta: typing.Mapping[str, Any]) -> str | None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = [c for c in map(str, choices) if c.lower() == str(value).lower()]
        close = close or difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"must be one of {list(choices)}, got {value!r}{hint}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            return f"must be >= {meta['min']}, got {value}"
        if "max" in meta and value > meta["max"]:
            return f"must be <= {meta['max']}, got {value}"
        if "gt" in meta and value <= meta["gt"]:
            return f"must be > {meta['gt']}, got {value}"
    return None


def _union_members(hint: Any) -> tuple:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]
