"""Every collective goes through hf_zero/comm.py (so comm_stats() and the divergence detector
see it): an AST scan of hf_zero/ and hf_zero_kernels/ fails on a direct torch.distributed
collective anywhere else."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("hf_zero", "hf_zero_kernels")
# Files allowed to call torch.distributed's collectives, each with its reason.
ALLOWED = {
    "hf_zero/comm.py": "the one module that issues collectives, counting and checking each",
    "hf_zero/_torch_compat.py": "names torch's collectives by this torch's version; only comm.py calls them",
}
# torch.distributed's collective entry points (torch 2.13), public and private.
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_single", "all_gather_coalesced", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor",
    "reduce_scatter_single", "_reduce_scatter_base", "all_to_all", "all_to_all_single", "broadcast",
    "broadcast_object_list", "_broadcast_coalesced", "barrier", "monitored_barrier", "reduce", "gather",
    "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "send_object_list", "recv_object_list",
}
# Modules whose every function is a collective.
COLLECTIVE_MODULES = ("torch.distributed._functional_collectives", "torch.distributed.nn")
DIST_MODULES = ("torch.distributed", "torch.distributed.distributed_c10d")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _dist_aliases(tree: ast.AST) -> set[str]:
    """Names bound to torch.distributed (or its c10d module) in this file."""
    aliases = set(DIST_MODULES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name in DIST_MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.distributed"):
            aliases |= {a.asname or a.name for a in node.names if a.name in ("distributed", "distributed_c10d")}
    return aliases


def direct_collectives(source: str, name: str = "<source>") -> list[str]:
    """``file:line what`` for each direct use of a torch.distributed collective in ``source``."""
    tree = ast.parse(source, name)
    aliases = _dist_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = _dotted(node.value)
            via_c10d = base.endswith(".distributed_c10d") and base.rsplit(".", 1)[0] in aliases
            if base in aliases or via_c10d:
                found.append(f"{name}:{node.lineno} {base}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(COLLECTIVE_MODULES):
                found.append(f"{name}:{node.lineno} from {node.module} import ...")
            elif node.module in DIST_MODULES:
                found += [f"{name}:{node.lineno} from {node.module} import {a.name}"
                          for a in node.names if a.name in COLLECTIVES]
        elif isinstance(node, ast.Import):
            found += [f"{name}:{node.lineno} import {a.name}" for a in node.names
                      if a.name.startswith(COLLECTIVE_MODULES)]
    return found


def test_no_collective_outside_comm():
    offenders = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in ALLOWED:
                offenders += direct_collectives(path.read_text(), rel)
    assert not offenders, ("collectives outside hf_zero/comm.py (call Collectives' methods instead, so they are "
                           "counted and checked): " + "; ".join(offenders))


def test_scanner_sees_each_spelling():
    # The scan itself must fail on each way of reaching a collective (a scan that sees nothing passes anything).
    spellings = [
        "import torch.distributed as dist\ndist.barrier()",
        "import torch.distributed as d\nd.all_reduce(t, group=g)",
        "import torch\ntorch.distributed.broadcast(t, 0)",
        "from torch import distributed\ndistributed.all_gather_object(out, v)",
        "import torch.distributed as dist\ndist.distributed_c10d.broadcast_object_list(b)",
        "from torch.distributed import all_to_all_single",
        "import torch.distributed._functional_collectives as funcol",
        "from torch.distributed.nn.functional import all_reduce",
    ]
    for source in spellings:
        assert direct_collectives(source), source
    harmless = "import torch.distributed as dist\ndist.get_rank(); dist.is_initialized(); comm.broadcast(t)"
    assert direct_collectives(harmless) == []
