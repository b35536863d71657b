"""Checkpoints of offloaded optimizer state are streamed ([Note: streamed optimizer state] in
hf_zero/offload/protocol.py): NVMe state goes through the swap buffers a bounded part at a
time, round-trips exactly at unaligned ranges, and saving / loading a 100M-parameter model's
checkpoint adds almost nothing to peak RSS. Exact resume across backends: test_offload.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_zero
from hf_zero.checkpoint import CheckpointError
from hf_zero.checkpoint.layout import owned_pieces
from test_offload_local import _config, _step, tiny_gpt2

HERE = Path(__file__).parent


@pytest.fixture
def nvme_engine(tmp_path):
    # bf16: the fp32 master is swapped too (three kinds); sub-groups of 1000 elements, so the
    # chunks (up to 4096 elements) cross several sub-group files at unaligned offsets.
    config = _config(path=tmp_path, stage=1)
    config["bf16"] = {"enabled": True}
    config["zero_optimization"]["sub_group_size"] = 1000
    engine = hf_zero.initialize(tiny_gpt2(), config)
    _step(engine)
    yield engine
    engine.destroy()


def _read(offload, key: tuple, start: int, length: int) -> torch.Tensor:
    buffers = {slot.buffer.untyped_storage().data_ptr() for slot in offload.slots}
    parts = []
    for part in offload.read_state(*key, start, length):
        assert part.untyped_storage().data_ptr() in buffers   # a view of a swap buffer, nothing allocated
        parts.append(part.clone())
    return torch.cat(parts)


def test_streamed_nvme_state_round_trips_at_unaligned_ranges(nvme_engine):
    offload = nvme_engine.offload
    chunks = [(g, c, m.numel()) for g, ms in enumerate(offload.masters.masters) for c, m in enumerate(ms)]
    reference = {(kind, g, c): _read(offload, (kind, g, c), 0, n)
                 for kind in ("master", "exp_avg", "exp_avg_sq") for g, c, n in chunks}
    assert all(ref.abs().sum() > 0 for ref in reference.values())   # trained: real values, not zeros
    generator = torch.Generator().manual_seed(0)
    for (kind, g, c), ref in reference.items():
        n = ref.numel()
        for start, length in ((1, n - 2), (n // 3, 1), (n - 7, 7), (0, n // 2 + 3), (5, min(1029, n - 5))):
            values = torch.randn(length, generator=generator)
            offload.write_state(kind, g, c, start, length,
                                lambda offset, part, values=values: part.copy_(values[offset:offset + part.numel()]))
            ref[start:start + length] = values
    for key, ref in reference.items():   # every element, neighbours of each write included
        assert torch.equal(_read(offload, key, 0, ref.numel()), ref), key
    for g, c, _ in chunks:               # a written master reaches its bf16 parameter chunk
        assert torch.equal(offload.masters.owned_params[g][c], reference[("master", g, c)].bfloat16())


def _state(offload) -> dict:
    return {(kind, g, c): _read(offload, (kind, g, c), 0, m.numel()) for kind in ("master", "exp_avg", "exp_avg_sq")
            for g, ms in enumerate(offload.masters.masters) for c, m in enumerate(ms)}


@pytest.mark.parametrize("damage", ("corrupted", "incomplete"))
def test_damaged_checkpoint_fails_before_any_state_is_overwritten(nvme_engine, tmp_path, damage):
    path = nvme_engine.save_checkpoint(tmp_path / "ckpt", tag="a")
    _step(nvme_engine, 1)   # the state moves on from the checkpoint
    before = _state(nvme_engine.offload)
    if damage == "corrupted":   # caught by the file's checksum, on the first read
        shard = path / "rank_00000.safetensors"
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:   # the second moment of the parameter loaded last is missing: found only by checking first
        last = owned_pieces(nvme_engine.flat_groups, 0)[-1].name
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["pieces"] = {k: v for k, v in manifest["pieces"].items()
                              if (v["kind"], v["name"]) != ("state.exp_avg_sq", last)}
        (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="corrupted" if damage == "corrupted" else "no 'state.exp_avg_sq' data"):
        nvme_engine.load_checkpoint(tmp_path / "ckpt", tag="a")
    after = _state(nvme_engine.offload)
    assert all(torch.equal(before[key], after[key]) for key in before)


def _checkpoint_memory_run(device: str, tmp_path: Path) -> dict:
    swap, ckpt = tmp_path / "swap", tmp_path / "ckpt"
    swap.mkdir()
    out = subprocess.run([sys.executable, str(HERE / "offload_checkpoint_memory_case.py"), device, str(swap),
                          str(ckpt)], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_nvme_checkpoint_save_and_load_stay_within_the_swap_buffers(tmp_path):
    # 100.7M fp32 parameters: 0.75 GiB of Adam moments in swap files, 76 MiB of swap buffers.
    # Materialising the state (what save and load did before) grew peak RSS by 1.0x and 1.5x
    # the state; streamed, the growth must stay far below even the buffers.
    run = _checkpoint_memory_run("nvme", tmp_path)
    assert run["num_params"] >= 100_000_000 and run["resumed_exactly"], run
    bound = run["offload_buffer_bytes"] // 2
    assert run["save_rss_growth_bytes"] < bound and run["load_rss_growth_bytes"] < bound, run
    assert run["optimizer_state_bytes"] > 20 * bound
