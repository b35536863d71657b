"""Checkpoint bad input and crash safety (single process, no process group)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hf_zero
from hf_zero.checkpoint import CheckpointError
from parity_cases import batch, tiny_gpt2

CONFIG = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"params": {"lr": 1e-3}},
          "zero_optimization": {"stage": 2, "reduce_bucket_size": 4000}}


def trained_engine(n_embd: int = 32):
    model = tiny_gpt2(n_embd=n_embd)
    engine = hf_zero.initialize(model, CONFIG)
    x = batch(0, 0, 0)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    return model, engine


@pytest.fixture
def saved(tmp_path):
    _, engine = trained_engine()
    path = engine.save_checkpoint(tmp_path, tag="good")
    return tmp_path, path


def fresh_engine(n_embd: int = 32):
    return hf_zero.initialize(tiny_gpt2(n_embd=n_embd), CONFIG)


def test_layout_and_latest(saved):
    root, path = saved
    assert (root / "latest").read_text() == "good"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank_00000.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["files"]["rank_00000.safetensors"]["sha256"]
    assert not list(root.glob(".*"))   # no temporary directories left behind


def test_truncated_file_is_named(saved):
    root, path = saved
    shard = path / "rank_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated.*rank_00000.safetensors"):
        fresh_engine().load_checkpoint(root)


def test_corrupted_bytes_are_caught_by_checksum(saved):
    root, path = saved
    shard = path / "rank_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted.*rank_00000.safetensors"):
        fresh_engine().load_checkpoint(root)


def test_missing_rank_file_is_named(saved):
    root, path = saved
    (path / "rank_00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint file.*rank_00000"):
        fresh_engine().load_checkpoint(root)


def test_checkpoint_of_another_model(saved):
    root, _ = saved
    with pytest.raises(CheckpointError, match="another model.*shape mismatches"):
        fresh_engine(n_embd=64).load_checkpoint(root)


@pytest.mark.parametrize("tag", ["../escape", "a/b", "/abs", "..", ".hidden", ""])
def test_tags_cannot_escape(saved, tag):
    root, _ = saved
    _, engine = trained_engine()
    with pytest.raises(ValueError, match="invalid checkpoint tag"):
        engine.save_checkpoint(root, tag=tag)
    with pytest.raises(ValueError, match="invalid checkpoint tag"):
        engine.load_checkpoint(root, tag=tag)
    (root / "latest").write_text(tag)
    with pytest.raises(ValueError, match="invalid checkpoint tag"):
        engine.load_checkpoint(root)


def test_non_json_client_state_fails_before_writing(tmp_path):
    _, engine = trained_engine()
    with pytest.raises(TypeError, match="client_state must be JSON"):
        engine.save_checkpoint(tmp_path / "ck", client_state={"tensor": torch.zeros(1)})
    assert not (tmp_path / "ck").exists()


def test_no_pickle_anywhere(saved):
    _, path = saved
    for file in path.iterdir():
        assert not file.read_bytes().startswith(b"\x80"), f"{file} looks like a pickle"


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import hf_zero, hf_zero.checkpoint.save as save
    from parity_cases import batch, tiny_gpt2
    engine = hf_zero.initialize(tiny_gpt2(), {config!r})
    engine.save_checkpoint({root!r}, tag="first")
    x = batch(0, 0, 0)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    save._after_file_written = lambda path: os._exit(9)   # die right after the shard is written
    engine.save_checkpoint({root!r}, tag={second!r})
""")


@pytest.mark.parametrize("second", ["second", "first"], ids=("new-tag", "same-tag"))
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, second):
    tests = str(Path(__file__).parent)
    script = CRASH_SCRIPT.format(tests=tests, config=CONFIG, root=str(tmp_path), second=second)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 9, result.stderr[-2000:]
    assert (tmp_path / "latest").read_text() == "first"
    engine = fresh_engine()
    path, _ = engine.load_checkpoint(tmp_path)
    assert path.name == "first" and engine.global_steps == 0
    assert not (tmp_path / "second").exists()


def test_failed_rename_when_resaving_a_tag_restores_the_previous_checkpoint(saved, monkeypatch):
    root, _ = saved
    _, engine = trained_engine()
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".good.tmp-"):   # the new checkpoint moving into place
            raise OSError("rename failed (test)")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    # one process: the rank's own error (with ranks: CheckpointError naming rank 0)
    with pytest.raises(OSError, match="rename failed"):
        engine.save_checkpoint(root, tag="good")
    monkeypatch.undo()
    assert (root / "latest").read_text() == "good" and (root / "good" / "manifest.json").is_file()
    assert not list(root.glob(".good.old-*"))
    fresh_engine().load_checkpoint(root)
