"""``hf-zero launch --config CONFIG [--nproc N] script.py ARGS...``: run an unmodified script under
hf_zero on N local processes through the real launchers.

- An hf_zero config (JSON/YAML file or inline JSON): ``python -m torch.distributed.run
  --standalone --nproc_per_node N -m hf_zero.integrations.bootstrap script.py ARGS``.
- An accelerate config YAML with an ``hf-zero:`` section (accelerate itself rejects unknown
  top-level keys): the section is split out, the rest written to a temporary file, and
  ``python -m accelerate.commands.launch --config_file TMP -m hf_zero.integrations.bootstrap
  script.py ARGS`` runs it. accelerate 1.15 starts several CPU processes only through
  ``mpirun`` (``distributed_type: MULTI_CPU`` without ``mpirun_hostfile`` gives one process),
  so a multi-process CPU config is passed on as accelerate's multi-process (torchrun)
  launcher with ``ACCELERATE_USE_CPU=true``: the same processes, on CPU, with gloo.

Either way the config reaches every rank as ``HF_ZERO_CONFIG`` (an absolute path or inline
JSON), and is validated here first so a bad key fails before any process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from hf_zero.config import load_config
from hf_zero.integrations.common import CONFIG_ENV

SECTION = "hf-zero"
_ACCELERATE_KEYS = ("distributed_type", "compute_environment")
BOOTSTRAP = "hf_zero.integrations.bootstrap"


def split_config(config: str) -> tuple[Optional[dict], str]:
    """(accelerate config dict or None, the value for ``HF_ZERO_CONFIG``). Raises on bad input."""
    text = config.strip()
    path = Path(text)
    if not text.startswith("{") and path.suffix in (".yaml", ".yml"):
        import yaml

        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping")
        section = data.pop(SECTION, None)
        if section is not None:
            if not isinstance(section, dict):
                raise ValueError(f"{path}: the '{SECTION}' section must be a mapping")
            load_config(section)   # validate ('auto' allowed) before starting anything
            return data, json.dumps(section)
        if any(key in data for key in _ACCELERATE_KEYS):
            raise ValueError(f"{path} is an accelerate config without an '{SECTION}:' section; add one with the "
                             f"hf_zero config, or pass the hf_zero config itself")
    load_config(text)
    return None, text if text.startswith("{") else str(path.resolve())


def _accelerate_config(data: dict, nproc: Optional[int], env: dict) -> dict:
    data = dict(data)
    if nproc is not None:
        data["num_processes"] = nproc
    multi = int(data.get("num_processes", 1)) > 1
    if multi and data.get("use_cpu") and data.get("distributed_type") == "MULTI_CPU" and not data.get(
            "mpirun_hostfile"):
        data["distributed_type"] = "MULTI_GPU"   # accelerate's torchrun launcher; the ranks run on CPU:
        env["ACCELERATE_USE_CPU"] = "true"
    return data


def build_command(config: str, nproc: Optional[int], script: str, script_args: list[str],
                  tmp_dir: str) -> tuple[list[str], dict]:
    """The launcher command line and its environment."""
    accelerate_data, value = split_config(config)
    env = dict(os.environ, **{CONFIG_ENV: value})
    if accelerate_data is None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(nproc or 1), "-m", BOOTSTRAP, script, *script_args]
        return command, env
    import yaml

    acc_file = Path(tmp_dir) / "accelerate_config.yaml"
    acc_file.write_text(yaml.safe_dump(_accelerate_config(accelerate_data, nproc, env)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_file), "-m", BOOTSTRAP,
               script, *script_args]
    return command, env


def launch(config: str, nproc: Optional[int], script: str, script_args: list[str], dry_run: bool = False) -> int:
    if not Path(script).is_file():
        raise FileNotFoundError(f"script not found: {script}")
    with tempfile.TemporaryDirectory(prefix="hf_zero_launch_") as tmp:
        command, env = build_command(config, nproc, script, script_args, tmp)
        if dry_run:
            print(f"{CONFIG_ENV}={env[CONFIG_ENV]} " + " ".join(command))
            return 0
        return subprocess.call(command, env=env)
