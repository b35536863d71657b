"""``hf-zero launch [--config CONFIG] [--nproc N] script.py ARGS...``: run an unmodified script
under hf_zero on N local processes through the real launchers.

- The config: ``--config`` (hf_zero / DeepSpeed JSON or YAML, inline JSON, or an accelerate
  yaml), or else the script's own ``--deepspeed CONFIG`` (a DeepSpeed user's command line
  works unchanged; the bootstrap takes the flag out before the script parses it).
- An hf_zero / DeepSpeed config: ``python -m torch.distributed.run --standalone
  --nproc_per_node N -m hf_zero.integrations.bootstrap script.py ARGS``. Without CUDA,
  ``ACCELERATE_USE_CPU=true`` is set so accelerate scripts (and the Trainer) form one
  multi-process CPU group, as the yaml route does.
- An accelerate yaml with an ``hf-zero:`` section or ``distributed_type: DEEPSPEED``
  (accelerate_config.py): ``python -m accelerate.commands.launch --config_file TMP -m
  hf_zero.integrations.bootstrap script.py ARGS`` with the rest of the yaml in TMP.

Several nodes (multinode.py, docs/multinode.md): torchrun's ``--nnodes``, ``--node-rank``,
``--master-addr``, ``--master-port``, ``--rdzv-*`` and ``--max-restarts`` replace
``--standalone`` (accelerate: ``--num_machines``, ``--machine_rank``, ``--main_process_ip``,
``--main_process_port``); under SLURM they come from the job's environment.

Either way the config reaches every rank as ``HF_ZERO_CONFIG`` (an absolute path or inline
JSON), and is validated here first so a bad key fails before any process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

from hf_zero.config import load_config
from hf_zero.integrations.accelerate_config import (ACCELERATE_KEYS, accelerate_launch_config, read_yaml,
                                                    split_accelerate_yaml)
from hf_zero.integrations.common import ALLOW_UNSHARDED_ENV, CONFIG_ENV, set_cpu_multiprocess, take_deepspeed_flag
from hf_zero.integrations.multinode import RESTART_STORE_ENV, NodeOptions, from_slurm

BOOTSTRAP = "hf_zero.integrations.bootstrap"

# The `deepspeed` launcher's options: those that map onto this launcher (--num_nodes is
# --nnodes; --master_addr, --master_port, --node_rank are torchrun's own), and those that do not.
DEEPSPEED_NPROC_SPELLINGS = ("--num_gpus", "--num_processes")
DEEPSPEED_UNSUPPORTED = ("--hostfile", "--include", "--exclude", "--launcher", "--launcher_args", "--module",
                         "--no_python", "--no_local_rank",
                         "--autotuning", "--elastic_training", "--min_elastic_nodes", "--max_elastic_nodes",
                         "--bind_cores_to_rank", "--bind_core_list", "--force_multi", "--enable_each_rank_log",
                         "--ssh_port", "--save_pid", "--use_env", "--venv_script", "--comment")


def split_config(config: str) -> tuple[Optional[dict], str, dict]:
    """(accelerate config dict or None, the value for ``HF_ZERO_CONFIG``, extra environment)."""
    text = config.strip()
    path = Path(text)
    if not text.startswith("{") and path.suffix in (".yaml", ".yml"):
        data = read_yaml(path)
        if "hf-zero" in data or any(key in data for key in ACCELERATE_KEYS):
            accelerate_data, section, env = split_accelerate_yaml(path, data)
            load_config(section)   # validate ('auto' allowed) before starting anything
            return accelerate_data, json.dumps(section), env
    load_config(text)
    return None, text if text.startswith("{") else str(path.resolve()), {}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_config(config: Optional[str], script_args: list[str]) -> str:
    """``--config``, else the script's ``--deepspeed``; both must agree when both are given."""
    _, deepspeed = take_deepspeed_flag(script_args)
    if config is None and deepspeed is None:
        raise ValueError("no config: pass --config CONFIG, or keep the script's --deepspeed CONFIG")
    if config is not None and deepspeed is not None and _normalized(config) != _normalized(deepspeed):
        raise ValueError(f"--config {config} and the script's --deepspeed {deepspeed} differ; give one")
    if config is not None:
        return config
    assert deepspeed is not None   # both None raised above
    return deepspeed


def _normalized(config: str) -> str:
    return str(Path(config).resolve()) if not config.lstrip().startswith("{") else json.dumps(json.loads(config))


def build_command(config: Optional[str], nproc: Optional[int], script: str, script_args: list[str],
                  tmp_dir: str, allow_unsharded: bool = False,
                  nodes: NodeOptions = NodeOptions()) -> tuple[list[str], dict]:
    """The launcher command line and its environment (``nodes``: already filled from SLURM)."""
    nodes.check()
    accelerate_data, value, extra_env = split_config(choose_config(config, script_args))
    env = {**nodes.launcher_env(), **os.environ, CONFIG_ENV: value, **extra_env}
    env.pop("ACCELERATE_USE_DEEPSPEED", None)   # accelerate's DeepSpeed switch: hf_zero replaces it
    if allow_unsharded:
        env[ALLOW_UNSHARDED_ENV] = "1"
    cuda = _cuda_available()
    if accelerate_data is None:
        set_cpu_multiprocess(env, cuda)
        command = [sys.executable, "-m", "torch.distributed.run", *nodes.torchrun_args(), "--nproc_per_node",
                   str(nproc or 1), "-m", BOOTSTRAP, script, *script_args]
        return command, env
    import yaml

    acc_file = Path(tmp_dir) / "accelerate_config.yaml"
    acc_data = accelerate_launch_config(accelerate_data, nproc, env, cuda, nodes.multi_node)
    acc_file.write_text(yaml.safe_dump(acc_data))
    per_node = nproc if nproc is not None else (int(acc_data.get("num_processes", 1) or 1)
                                                // int(acc_data.get("num_machines", 1) or 1))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_file),
               *nodes.accelerate_args(per_node), "-m", BOOTSTRAP, script, *script_args]
    return command, env


def launch(config: Optional[str], nproc: Optional[int], script: str, script_args: list[str], dry_run: bool = False,
           allow_unsharded: bool = False, nodes: NodeOptions = NodeOptions()) -> int:
    if not Path(script).is_file():
        raise FileNotFoundError(f"script not found: {script}")
    nodes, slurm_hosts = from_slurm(nodes)
    with tempfile.TemporaryDirectory(prefix="hf_zero_launch_") as tmp:
        command, env = build_command(config, nproc, script, script_args, tmp, allow_unsharded, nodes)
        if not dry_run:
            return subprocess.call(command, env=env)
        if not slurm_hosts:
            print(_shown(command, env))
            return 0
        for node_rank, host in enumerate(slurm_hosts):   # what srun starts on each node
            node_command, node_env = build_command(config, nproc, script, script_args, tmp, allow_unsharded,
                                                   replace(nodes, node_rank=node_rank))
            print(f"# node {node_rank} ({host}){' <- this node' if node_rank == nodes.node_rank else ''}")
            print(_shown(node_command, node_env))
        return 0


def _shown(command: list[str], env: dict) -> str:
    extra = {k: env[k] for k in (CONFIG_ENV, "ACCELERATE_USE_CPU", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                                 ALLOW_UNSHARDED_ENV, RESTART_STORE_ENV) if k in env}
    return " ".join(f"{k}={v}" for k, v in extra.items()) + " " + " ".join(command)
