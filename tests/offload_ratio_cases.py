"""Rank functions for the partial-offload tests (``offload_optimizer.ratio`` < 1).

References: the same run without offload and with full offload (ratio 1), same seed and
data per rank (both themselves tested against DDP / each other in test_parity.py and
test_offload.py). Runs inside the processes spawned once by ``hf_zero.testing.run_on_ranks``.
"""

from __future__ import annotations

import os
from pathlib import Path

import hf_zero
import offload_cases as oc
import parity_cases as pc

SUB_GROUP = 1400   # ~11 sub-groups of a rank's ~15000 elements (chunks of <= 1500: one straddles the boundary)
# (stage, bf16, clip, device, ratio): a split chunk at the device/offload boundary in each;
# fp32 host parameters are their own masters, bf16 keeps fp32 master copies that are split too.
PARTIAL = [(2, False, pc.CLIP, "cpu", 0.5), (3, True, 0.0, "nvme", 0.4), (1, False, pc.CLIP, "nvme", 0.3),
           (3, True, pc.CLIP, "cpu", 0.7)]


def config(stage: int, world: int, device: str, swap: str, bf16: bool, clip: float, ratio: float) -> dict:
    cfg = oc.config(stage, world, device, swap, bf16, clip=clip)
    cfg["zero_optimization"]["offload_optimizer"]["ratio"] = ratio
    cfg["zero_optimization"]["sub_group_size"] = SUB_GROUP
    return cfg


def _state_bytes(engine) -> dict:
    """Bytes of optimizer state (fp32 masters when copies, Adam moments) by who holds them,
    read from the storages themselves / the swap files on disk."""
    offload = engine.offload
    kinds = (("master",) if offload.masters.keeps_copy else ()) + offload.state_keys
    storages: dict[int, int] = {}
    for master in (m for g in offload.masters.masters for m in g):
        for kind in kinds:
            tensor = master if kind == "master" else engine.optimizer.inner.state[master][kind]
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    for tensor in offload.split_parts():   # the split chunk's parts
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    resident = sum(n for n in storages.values() if n)   # nvme: placeholders hold 0 bytes
    offloaded = offload.memory_by_location()
    files = []
    if offload.location == "nvme":
        files = [f for d in oc.swap_dirs(offload.nvme_path, engine.comm.rank)
                 for f in (Path(offload.nvme_path) / d).glob("sub_group_*.bin")]
    elements = sum(m.numel() for g in offload.masters.masters for m in g)
    offloaded_elements = sum(sg.numel for sg in offload.plan[offload.num_on_device:])
    return {"resident": resident, "host": offloaded["offload_host"],
            "nvme_files": sum(os.path.getsize(f) for f in files),
            "nvme_reported": offloaded["offload_nvme"], "kinds": len(kinds), "elements": elements,
            "offloaded_elements": offloaded_elements, "sub_groups": len(offload.plan),
            "on_device": offload.num_on_device, "split_chunks": len(offload.split),
            "buffers": sum(t.untyped_storage().nbytes() for t in offload.buffer_tensors())}


def _run(rank, world, swap, stage, bf16, clip, device, ratio):
    model = pc.tiny_gpt2()
    engine = hf_zero.initialize(model, config(stage, world, device, swap, bf16, clip, ratio))
    losses = oc.train(engine, rank, 0, oc.STEPS)
    state = _state_bytes(engine) if device != "none" else None
    params = pc.full_params(model) if stage < 3 else None
    engine.destroy()
    return losses, params or pc.full_params(model), state


def parity_grid(rank: int, world: int, swap: str) -> dict:
    """Per partial case: (none, full offload, partial) runs."""
    out = {}
    for stage, bf16, clip, device, ratio in PARTIAL:
        runs = (("none", 1.0), (device, 1.0), (device, ratio))
        out[(stage, bf16, clip, device, ratio)] = tuple(_run(rank, world, swap, stage, bf16, clip, d, r)
                                                        for d, r in runs)
    return out


RESUME = {(3, True): [(("cpu", 0.5), [("nvme", 1.0), ("cpu", 0.3), ("none", 1.0)]), (("nvme", 0.4), [("cpu", 1.0)])],
          (2, False): [(("cpu", 0.5), [("nvme", 0.3)])]}


def resume_grid(rank: int, world: int, swap: str, root: str) -> dict:
    """Save after 2 steps with one (device, ratio), resume with another, continue 2 steps."""
    out = {}
    for (stage, bf16), sources in RESUME.items():
        engine = hf_zero.initialize(pc.tiny_gpt2(), config(stage, world, "none", swap, bf16, pc.CLIP, 1.0))
        uninterrupted = oc.train(engine, rank, 0, oc.STEPS)
        engine.destroy()
        for (src, src_ratio), targets in sources:
            engine = hf_zero.initialize(pc.tiny_gpt2(), config(stage, world, src, swap, bf16, pc.CLIP, src_ratio))
            first = oc.train(engine, rank, 0, 2)
            path = engine.save_checkpoint(str(Path(root) / f"s{stage}{bf16}{src}{src_ratio}"))
            engine.destroy()
            for dst, dst_ratio in targets:
                engine = hf_zero.initialize(pc.tiny_gpt2(seed=1),   # other weights: the checkpoint brings them
                                            config(stage, world, dst, swap, bf16, pc.CLIP, dst_ratio))
                engine.load_checkpoint(str(path.parent))
                resumed = first + oc.train(engine, rank, 2, oc.STEPS - 2)
                out[(stage, bf16, src, src_ratio, dst, dst_ratio)] = (uninterrupted, resumed)
                engine.destroy()
    return out
