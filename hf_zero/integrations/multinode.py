"""``hf-zero launch`` on several nodes: torchrun's multi-node options, filled from SLURM when
the job runs under it, and their accelerate spellings.

torchrun does the rendezvous; hf_zero adds no launcher or transport of its own. One node
(``--nnodes 1`` and no rendezvous endpoint) keeps ``--standalone``; several nodes pass the
options through (static rendezvous with ``--master-addr``/``--master-port`` and
``--node-rank``, or ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID``).

Under SLURM (``SLURM_JOB_NODELIST``, ``SLURM_NNODES``, ``SLURM_NODEID``; only when
``--nnodes`` is not given) the node count, this node's rank and the master address (the
nodelist's first host, expanded here: ``node[01-04]`` -> ``node01``) come from the
environment; the port is ``--master-port`` or torchrun's default 29500. docs/multinode.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional

DEFAULT_MASTER_PORT = 29500   # torchrun's and accelerate's default
RESTART_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


@dataclass(frozen=True)
class NodeOptions:
    """torchrun's multi-node options as given (None: not given)."""

    nnodes: Optional[str] = None          # "N" or an elastic "MIN:MAX"
    node_rank: Optional[int] = None
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    rdzv_backend: Optional[str] = None
    rdzv_endpoint: Optional[str] = None
    rdzv_id: Optional[str] = None
    max_restarts: Optional[int] = None

    @property
    def multi_node(self) -> bool:
        return (self.nnodes not in (None, "1", "1:1")) or self.rdzv_endpoint is not None

    def check(self) -> None:
        """Several nodes without a rendezvous endpoint is torchrun's static rendezvous: every node
        must be told its rank and where rank 0 is (torchrun's defaults would start N node-0s)."""
        if self.multi_node and self.rdzv_endpoint is None:
            missing = [flag for flag, value in (("--node-rank", self.node_rank), ("--master-addr", self.master_addr))
                       if value is None]
            if missing:
                raise ValueError(f"--nnodes {self.nnodes} needs {' and '.join(missing)} on every node (or "
                                 f"--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID); see docs/multinode.md")
        if self.multi_node and self.max_restarts and self.rdzv_endpoint is None:
            raise ValueError("--max-restarts on several nodes needs the c10d rendezvous (--rdzv-backend c10d "
                             "--rdzv-endpoint HOST:PORT --rdzv-id ID): torchrun's static rendezvous (--master-addr) "
                             "keeps one store across restarts and the restarted ranks read the old addresses")
        if self.node_rank is not None and self.nnodes is not None and ":" not in self.nnodes \
                and not 0 <= self.node_rank < int(self.nnodes):
            raise ValueError(f"--node-rank {self.node_rank} is outside 0..{int(self.nnodes) - 1} "
                             f"(--nnodes {self.nnodes})")

    def launcher_env(self) -> dict:
        """torchrun shares its rendezvous store with the workers by default, and a restarted
        group then reads the previous attempt's keys (the dead ranks' addresses: connection
        refused, pytorch/pytorch#135712); a store per attempt avoids that."""
        return {RESTART_STORE_ENV: "1"} if self.max_restarts else {}

    def torchrun_args(self) -> list[str]:
        """The torchrun options: ``--standalone`` on one node, the given ones otherwise."""
        args = [] if self.multi_node else ["--standalone"]
        if self.multi_node:
            for flag, value in (("--nnodes", self.nnodes), ("--node-rank", self.node_rank),
                                ("--master-addr", self.master_addr), ("--master-port", self.master_port),
                                ("--rdzv-backend", self.rdzv_backend), ("--rdzv-endpoint", self.rdzv_endpoint),
                                ("--rdzv-id", self.rdzv_id)):
                if value is not None:
                    args += [flag, str(value)]
        if self.max_restarts is not None:
            args += ["--max-restarts", str(self.max_restarts)]
        return args

    def accelerate_args(self, nproc_per_node: int) -> list[str]:
        """``accelerate launch`` options: it counts processes over all machines and derives the
        rendezvous endpoint from ``main_process_ip``/``main_process_port``."""
        if self.rdzv_id is not None:
            raise ValueError("--rdzv-id has no accelerate spelling (accelerate launch derives the rendezvous from "
                             "--master-addr/--master-port); use an hf_zero / DeepSpeed config (the torchrun route) or "
                             "drop it")
        args: list[str] = []
        if self.multi_node:
            machines = int(str(self.nnodes).split(":")[-1]) if self.nnodes is not None else 1
            host, port = self.master_addr, self.master_port
            if self.rdzv_endpoint is not None:
                host, _, port_text = self.rdzv_endpoint.rpartition(":")
                port = int(port_text) if port_text else port
            args += ["--num_machines", str(machines), "--num_processes", str(nproc_per_node * machines),
                     "--machine_rank", str(self.node_rank or 0)]
            if host:
                args += ["--main_process_ip", host]
            if port is not None:
                args += ["--main_process_port", str(port)]
            if self.rdzv_backend is not None:
                args += ["--rdzv_backend", self.rdzv_backend]
        if self.max_restarts is not None:
            args += ["--max_restarts", str(self.max_restarts)]
        return args


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list: ``a[01-03,07],b`` -> a01 a02 a03 a07 b (zero padding kept)."""
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        hosts += _expand_host(item)
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return [item for item in items if item]


def _expand_host(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    prefix, rest = item[:match.start()], item[match.end():]
    values: list[str] = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        if not high:
            values.append(low)
            continue
        if not (low.isdigit() and high.isdigit()):
            raise ValueError(f"SLURM_JOB_NODELIST: cannot expand range {part!r} in {item!r}")
        values += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return [prefix + value + tail for value in values for tail in _expand_host(rest)]


def slurm_hosts(env: Mapping[str, str]) -> list[str]:
    return expand_nodelist(env["SLURM_JOB_NODELIST"])


def from_slurm(options: NodeOptions, env: Optional[Mapping[str, str]] = None) -> tuple[NodeOptions, list[str]]:
    """(options with SLURM's values filled in, the job's hosts) when under a multi-node SLURM
    job and ``--nnodes`` was not given; the options unchanged and [] otherwise."""
    if env is None:
        env = os.environ
    if options.nnodes is not None or not env.get("SLURM_JOB_NODELIST") or int(env.get("SLURM_NNODES", "1")) <= 1:
        return options, []
    hosts = slurm_hosts(env)
    nnodes = int(env["SLURM_NNODES"])
    if len(hosts) != nnodes:
        raise ValueError(f"SLURM_JOB_NODELIST={env['SLURM_JOB_NODELIST']} names {len(hosts)} hosts but "
                         f"SLURM_NNODES={nnodes}; pass --nnodes/--node-rank/--master-addr yourself")
    if "SLURM_NODEID" not in env:
        raise ValueError("SLURM_NNODES > 1 but SLURM_NODEID is not set (run hf-zero launch through srun, one task "
                         "per node) or pass --node-rank")
    filled = replace(options, nnodes=str(nnodes),
                     node_rank=options.node_rank if options.node_rank is not None else int(env["SLURM_NODEID"]),
                     master_addr=options.master_addr or (None if options.rdzv_endpoint else hosts[0]),
                     master_port=options.master_port if options.master_port is not None or options.rdzv_endpoint
                     else DEFAULT_MASTER_PORT)
    return filled, hosts
