"""accelerate config files under ``hf-zero launch``: split an ``hf-zero:`` section out, or
translate an accelerate DeepSpeed config (``distributed_type: DEEPSPEED``) into an hf_zero
config, the way accelerate maps it onto DeepSpeed.

[Note: accelerate DeepSpeed yaml translation]
accelerate's launcher turns the ``deepspeed_config:`` section into environment variables that
its ``DeepSpeedPlugin`` reads (``accelerate/utils/launch.py``, ``utils/dataclasses.py``,
``Accelerator._prepare_deepspeed``); the same meanings here:

- ``zero_stage`` (default 2), ``offload_{optimizer,param}_device`` / ``*_nvme_path``,
  ``zero3_save_16bit_model``: the same ``zero_optimization`` keys.
- ``gradient_accumulation_steps``: ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` (the
  Accelerator's value, which wins over the script's); the config says ``"auto"``.
- ``gradient_clipping``: applied at every step; absent or ``"auto"`` is 1.0, the value
  ``Accelerator._prepare_deepspeed`` fills in.
- ``deepspeed_config_file``: that JSON is the config (the keys above must then be absent,
  as accelerate requires); absent ``gradient_accumulation_steps`` there is ``"auto"``.
- ``zero3_init_flag: true``: ``ACCELERATE_DEEPSPEED_ZERO3_INIT=true``, as accelerate's launcher
  sets it; at stage 3, models loaded after the ``Accelerator`` is created are built
  partitioned (partitioned_load.py). Absent means off (accelerate turns it on by default at
  stage 3; hf_zero keeps the model-built-whole path unless asked).
- ``deepspeed_moe_layer_cls_names``: one warning.
- ``num_machines > 1`` (with ``machine_rank``, ``main_process_ip``, ``main_process_port``) is
  handed to accelerate's torchrun launcher: ``hf-zero launch`` runs on every node, as
  ``accelerate launch`` with ``deepspeed_multinode_launcher: standard`` does; the pdsh-style
  keys (``deepspeed_hostfile``, ``deepspeed_{inclusion,exclusion}_filter``, another
  ``deepspeed_multinode_launcher``) start nothing here and warn (docs/multinode.md).

The full table is in docs/integrations.md.

``train_batch_size`` / ``train_micro_batch_size_per_gpu`` are ``"auto"`` (accelerate fills
them from the prepared data loader). The rest of the yaml is handed to accelerate with
``distributed_type`` set to its multi-process launcher (``MULTI_GPU``) or ``NO`` for one
process; without CUDA (or with ``use_cpu: true``) the ranks run on CPU
(``ACCELERATE_USE_CPU=true``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

from hf_zero.integrations.common import ZERO3_INIT_ENV

SECTION = "hf-zero"
ACCELERATE_KEYS = ("distributed_type", "compute_environment")
_FILE_EXCLUSIVE = ("zero_stage", "offload_optimizer_device", "offload_param_device", "offload_optimizer_nvme_path",
                   "offload_param_nvme_path", "gradient_accumulation_steps", "gradient_clipping",
                   "zero3_save_16bit_model")
_MULTINODE_ONLY = ("deepspeed_multinode_launcher", "deepspeed_hostfile", "deepspeed_inclusion_filter",
                   "deepspeed_exclusion_filter")
_KNOWN = (*_FILE_EXCLUSIVE, *_MULTINODE_ONLY, "zero3_init_flag", "deepspeed_config_file",
          "deepspeed_moe_layer_cls_names")


def read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return data


def split_accelerate_yaml(path: Path, data: dict) -> tuple[dict, dict, dict]:
    """(accelerate config, hf_zero config dict, extra environment) from an accelerate yaml with
    an ``hf-zero:`` section or ``distributed_type: DEEPSPEED``. Raises ValueError naming the key."""
    data = dict(data)
    section = data.pop(SECTION, None)
    deepspeed = str(data.get("distributed_type", "")).upper() == "DEEPSPEED"
    if section is not None:
        if not isinstance(section, dict):
            raise ValueError(f"{path}: the '{SECTION}' section must be a mapping")
        if deepspeed:
            raise ValueError(f"{path}: both an '{SECTION}:' section and distributed_type: DEEPSPEED; keep one")
        return data, section, {}
    if deepspeed:
        return translate_deepspeed_yaml(path, data)
    raise ValueError(f"{path} is an accelerate config without an '{SECTION}:' section or distributed_type: DEEPSPEED; "
                     f"add an '{SECTION}:' section with the hf_zero config, or pass the hf_zero config itself")


def translate_deepspeed_yaml(path: Path, data: dict) -> tuple[dict, dict, dict]:
    """See the note above."""
    ds = dict(data.pop("deepspeed_config", None) or {})
    unknown = sorted(set(ds) - set(_KNOWN))
    if unknown:
        raise ValueError(f"{path}: deepspeed_config.{unknown[0]} is not a key accelerate knows "
                         f"(known: {', '.join(_KNOWN)})")
    remote_starters = [key for key in _MULTINODE_ONLY if ds.get(key) not in (None, "", "standard")]
    if int(data.get("num_machines", 1) or 1) > 1 and remote_starters:
        warnings.warn(f"{path}: deepspeed_config.{remote_starters[0]} is ignored: hf-zero launch does not start "
                      f"the other nodes; run it on each node (srun, or --node-rank N there; docs/multinode.md)",
                      stacklevel=2)
    env: dict[str, str] = {}
    if ds.get("gradient_accumulation_steps") not in (None, "auto"):
        env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(int(ds["gradient_accumulation_steps"]))
    file = ds.get("deepspeed_config_file")
    if file not in (None, "", "none"):
        clashing = [key for key in _FILE_EXCLUSIVE if key in ds]
        if clashing:
            raise ValueError(f"{path}: deepspeed_config.{clashing[0]} is set together with deepspeed_config_file; "
                             f"accelerate refuses this too: put it in the DeepSpeed config file")
        config = _config_from_file(path, str(file))
    else:
        config = _config_from_keys(ds)
    if str(ds.get("zero3_init_flag", "")).lower() == "true":
        env[ZERO3_INIT_ENV] = "true"   # as accelerate's launcher passes it; applied at stage 3 (common.py)
    if ds.get("deepspeed_moe_layer_cls_names"):
        warnings.warn(f"{path}: deepspeed_config.deepspeed_moe_layer_cls_names is ignored (hf_zero gathers per "
                      f"module as usual)", stacklevel=2)
    several = int(data.get("num_processes", 1) or 1) > 1 or int(data.get("num_machines", 1) or 1) > 1
    data["distributed_type"] = "MULTI_GPU" if several else "NO"
    return data, config, env


def _config_from_file(path: Path, file: str) -> dict:
    target = Path(file)
    if not target.is_absolute() and not target.is_file():
        target = path.parent / target   # relative to the yaml when not relative to the working directory
    from hf_zero.config import read_config_dict

    config, _ = read_config_dict(str(target))
    config = dict(config)
    # accelerate fills these from the Accelerator / data loader when absent (HfDeepSpeedConfig)
    config.setdefault("gradient_accumulation_steps", "auto")
    return config


def _config_from_keys(ds: dict) -> dict:
    zero: dict[str, Any] = {"stage": int(ds.get("zero_stage", 2))}
    for kind in ("optimizer", "param"):
        device = str(ds.get(f"offload_{kind}_device", "none")).lower()
        if device != "none":
            zero[f"offload_{kind}"] = {"device": device}
            nvme = ds.get(f"offload_{kind}_nvme_path")
            if device == "nvme" and nvme not in (None, "none"):
                zero[f"offload_{kind}"]["nvme_path"] = str(nvme)
    if "zero3_save_16bit_model" in ds:
        zero["stage3_gather_16bit_weights_on_model_save"] = str(ds["zero3_save_16bit_model"]).lower() == "true"
    clipping = ds.get("gradient_clipping", "auto")
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": 1.0 if clipping in (None, "auto") else float(clipping),
            "zero_optimization": zero}


def accelerate_launch_config(data: dict, nproc: Optional[int], env: dict, cuda: bool,
                             multi_node: bool = False) -> dict:
    """The yaml handed to ``accelerate launch``: multi-process CPU runs go through accelerate's
    torchrun launcher with ``ACCELERATE_USE_CPU=true`` (accelerate 1.15 starts several CPU
    processes only through ``mpirun`` otherwise)."""
    data = dict(data)
    if nproc is not None:
        data["num_processes"] = nproc * int(data.get("num_machines", 1) or 1)   # accelerate counts all machines
    multi = multi_node or int(data.get("num_processes", 1) or 1) > 1
    on_cpu = bool(data.get("use_cpu")) or not cuda
    if multi and on_cpu and data.get("distributed_type") in ("MULTI_CPU", "MULTI_GPU", "NO") and not data.get(
            "mpirun_hostfile"):
        data["distributed_type"] = "MULTI_GPU"   # accelerate's torchrun launcher; the ranks run on CPU:
        env["ACCELERATE_USE_CPU"] = "true"
        data["use_cpu"] = True
    return data
