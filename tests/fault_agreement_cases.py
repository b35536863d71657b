"""Rank functions: a failure on rank 1 only is the same error on every rank, within seconds.

Each scenario records, per rank, the error type, its message and how long the failing call
took (a rank left waiting in a collective would take the process group's 120 s timeout).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import torch.distributed as dist

import hf_zero
from hf_zero.checkpoint import save as save_module
from parity_cases import batch, tiny_gpt2

CONFIG = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"params": {"lr": 1e-3}},
          "zero_optimization": {"stage": 2, "reduce_bucket_size": 4000}}


LONE_TIMEOUT_S = 2.0   # presence_timeout of the lone-call scenario


def _attempt(call) -> dict:
    start = time.monotonic()
    try:
        call()
        return {"error": None, "message": "", "seconds": time.monotonic() - start}
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err), "seconds": time.monotonic() - start}


def _trained_engine(config: dict = CONFIG):
    engine = hf_zero.initialize(tiny_gpt2(), config)
    x = batch(dist.get_rank(), 0, 0)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    return engine


def _disk_full(path: Path) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def checkpoint_faults(rank: int, world: int, root: str) -> dict:
    root = Path(root)
    out = {}
    engine = _trained_engine()
    engine.save_checkpoint(root, tag="good")

    # rank 1's disk is full while it writes its shard
    if rank == 1:
        save_module._after_file_written = _disk_full
    out["save"] = _attempt(lambda: engine.save_checkpoint(root, tag="broken"))
    save_module._after_file_written = save_module._no_op
    dist.barrier()
    out["after_save"] = {"latest": (root / "latest").read_text(), "broken_exists": (root / "broken").exists(),
                         "leftovers": sorted(p.name for p in root.iterdir() if p.name.startswith("."))}
    out["previous_loads"] = _attempt(lambda: _trained_engine().load_checkpoint(root))

    # rank 1's shard file is corrupt (rank 0 never reads that file at the same world size)
    engine.save_checkpoint(root, tag="v2")
    if rank == 1:
        shard = root / "v2" / "rank_00001.safetensors"
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    out["load"] = _attempt(lambda: _trained_engine().load_checkpoint(root, tag="v2"))
    out["good_still_loads"] = _attempt(lambda: _trained_engine().load_checkpoint(root, tag="good"))

    # the writing rank (0) fails while writing the HF export; rank 1 is gathering with it
    from hf_zero.checkpoint import hf_layout

    stage3 = _trained_engine({**CONFIG, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    original = hf_layout.write_safetensors
    if rank == 0:
        hf_layout.write_safetensors = lambda path, *a, **k: _disk_full(path)
    out["export"] = _attempt(lambda: stage3.save_16bit_model(str(root / "export"), max_shard_size="20KB"))
    hf_layout.write_safetensors = original

    # save_checkpoint / load_checkpoint on rank 0 alone (`if rank == 0:`): rank 0 raises after
    # presence_timeout naming rank 1, which goes straight on; then both ranks save together
    lone = _trained_engine({**CONFIG, "presence_timeout": LONE_TIMEOUT_S})
    if rank == 0:
        out["lone_save"] = _attempt(lambda: lone.save_checkpoint(root, tag="lone"))
        out["lone_load"] = _attempt(lambda: lone.load_checkpoint(root, tag="good"))
    dist.barrier()   # rank 1 is here at once
    out["lone_wrote"] = (root / "lone").exists()
    out["together"] = _attempt(lambda: lone.save_checkpoint(root, tag="together"))
    return out


def setup_faults(rank: int, world: int, swap_root: str) -> dict:
    out = {}
    # rank 1's NVMe swap directory does not exist
    swap = Path(swap_root) / ("swap" if rank == 0 else "missing")
    if rank == 0:
        swap.mkdir(exist_ok=True)
    nvme = {**CONFIG, "zero_optimization": {"stage": 2, "reduce_bucket_size": 4000, "offload_optimizer": {
        "device": "nvme", "nvme_path": str(swap), "buffer_count": 2}}}
    out["nvme"] = _attempt(lambda: hf_zero.initialize(tiny_gpt2(), nvme))
    param_nvme = {**CONFIG, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme",
                                                                                 "nvme_path": str(swap)}}}
    out["param_nvme"] = _attempt(lambda: hf_zero.initialize(tiny_gpt2(), param_nvme))
    # ranks built different models / configs
    out["model"] = _attempt(lambda: hf_zero.initialize(tiny_gpt2(n_layer=2 + rank), CONFIG))
    bucket = {**CONFIG, "zero_optimization": {"stage": 2, "reduce_bucket_size": 4000 + rank}}
    out["config"] = _attempt(lambda: hf_zero.initialize(tiny_gpt2(), bucket))
    # and afterwards the ranks still work together
    out["afterwards"] = _attempt(lambda: _trained_engine())
    return out
