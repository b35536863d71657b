"""Rank functions: a pretrained checkpoint that fails on rank 1 only is the same error on every rank.

Each rank loads its own copy of one sharded checkpoint (written by transformers'
``save_pretrained``); only rank 1's copy is broken, before ``hf_zero.from_pretrained`` (missing,
truncated, unparsable header, a wrong shape) or between it and ``hf_zero.initialize`` (a shard
truncated after its header was read). Each scenario records, per rank, the error type, its
message and how long the failing call took (a rank left waiting in a collective would take
the process group's 120 s timeout).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero
from fault_agreement_cases import _attempt   # the same timed attempt as the other fault cases
from parity_cases import tiny_gpt2

SHARD = "model-00002-of-00003.safetensors"   # the file rank 1's copy breaks


def _config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def write_checkpoint(root: Path) -> str:
    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(root / "good", max_shard_size="60KB")
    assert (root / "good" / SHARD).is_file(), sorted(p.name for p in (root / "good").iterdir())
    return str(root / "good")


def _truncate(file: Path, keep_data: int) -> None:
    """Keep the header and ``keep_data`` bytes of the data section (the header stays readable)."""
    raw = file.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    file.write_bytes(raw[:header_end + keep_data])


def _breakages(good: Path) -> dict:
    """scenario -> how rank 1's copy is broken before from_pretrained."""
    def bad_header(d: Path) -> None:
        (d / SHARD).write_bytes(b"\xff" * 8 + (d / SHARD).read_bytes()[8:])

    def wrong_shape(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(d / SHARD))
        key = sorted(tensors)[0]
        tensors[key] = torch.zeros(tensors[key].numel() + 1)
        save_file(tensors, str(d / SHARD), metadata={"format": "pt"})

    return {"missing_dir": lambda d: shutil.rmtree(d),
            "truncated_shard": lambda d: _truncate(d / SHARD, 100),
            "bad_header": bad_header,
            "wrong_shape": wrong_shape}


def pretrained_faults(rank: int, world: int, good: str, root: str) -> dict:
    good, mine = Path(good), Path(root) / f"rank{rank}"
    out = {}
    hf_zero.from_pretrained(good)   # imports transformers' GPT-2 code on both ranks first (5 s), outside the timings
    for scenario, breakage in _breakages(good).items():
        shutil.rmtree(mine, ignore_errors=True)
        shutil.copytree(good, mine)
        if rank == 1:
            breakage(mine)
        out[scenario] = _attempt(lambda: hf_zero.from_pretrained(mine))
    # the shard is truncated on rank 1 after from_pretrained read its header: the read fails
    # while initialize builds the shards (stage 3) or the whole parameters (stage 0)
    for stage in (0, 3):
        shutil.rmtree(mine, ignore_errors=True)
        shutil.copytree(good, mine)
        model = hf_zero.from_pretrained(mine)
        if rank == 1:
            _truncate(mine / SHARD, 100)
        out[f"read_stage{stage}"] = _attempt(lambda: hf_zero.initialize(model, _config(stage)))
    # and afterwards the ranks still work together
    out["afterwards"] = _attempt(lambda: hf_zero.initialize(hf_zero.from_pretrained(good), _config(3)).destroy())
    dist.barrier()
    return out
