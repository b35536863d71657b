"""Offload pieces in one process: sub-group planning, the swapper, setup and mid-run faults,
swap-file cleanup (stale directories of dead processes included), refusals, and the
peak-RSS saving of NVMe offload on a 100M model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hf_zero
from hf_zero.config import ConfigError
from hf_zero.offload import SwapIOError, SwapSetupError
from hf_zero.offload.subgroups import SPLIT_ALIGN, plan_sub_groups
from hf_zero.offload.swapper import ALIGN, AsyncFileIO, aligned_buffer
from parity_cases import batch, tiny_gpt2

HERE = Path(__file__).parent


def _config(device: str = "nvme", path=None, stage: int = 2, **offload) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 4000, "sub_group_size": 5000,
                                  "offload_optimizer": {"device": device, "nvme_path": path and str(path),
                                                        **offload}}}


def _step(engine, step: int = 0) -> float:
    x = batch(0, step, 0)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.parametrize("numels,size", [([[10, 3], [7]], 4), ([[4231]], 1000), ([[1, 1, 1]], 5),
                                         ([[5, 5], [], [5]], 5), ([[9]], 100), ([[4231, 1000], [777]], 1500),
                                         ([[130]], 100), ([[256, 64]], 128), ([[70, 70]], 63)])
def test_sub_groups_cover_every_element_once_within_the_limit(numels, size):
    plan = plan_sub_groups(numels, size)
    seen = {(g, c): [0] * n for g, ns in enumerate(numels) for c, n in enumerate(ns)}
    for index, sg in enumerate(plan):
        assert sg.index == index and 0 < sg.numel <= size
        cursor = 0
        for s in sg.slices:
            assert s.offset == cursor and s.length > 0
            if size >= SPLIT_ALIGN:   # [Note: split points]: chunks are cut at aligned elements only
                assert s.start % SPLIT_ALIGN == 0
            cursor += s.length
            for e in range(s.start, s.start + s.length):
                seen[(s.group, s.chunk)][e] += 1
        assert cursor == sg.numel
    assert all(count == 1 for counts in seen.values() for count in counts)
    # greedy: every sub-group but the last is full, up to the last aligned split point
    shortfall = SPLIT_ALIGN if size >= SPLIT_ALIGN else 1
    assert all(size - sg.numel < shortfall for sg in plan[:-1])


@pytest.mark.parametrize("direct", (True, False), ids=("o_direct", "buffered"))
def test_swapper_round_trips_aligned_buffers(tmp_path, direct):
    io = AsyncFileIO(num_threads=3, direct=direct)
    nbytes = 3 * 8 * 1024 * 1024 + ALIGN   # several requests, the last one short
    src, dst = aligned_buffer(nbytes), aligned_buffer(nbytes)
    assert src.data_ptr() % ALIGN == 0 and src.numel() == nbytes
    src.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    path = tmp_path / "f.bin"
    path.write_bytes(b"")
    io.write(path, src, nbytes).wait()
    io.read(path, dst, nbytes).wait()
    io.close()
    assert torch.equal(src, dst)


def test_missing_nvme_path_is_a_config_error():
    with pytest.raises(ConfigError, match="nvme_path"):
        hf_zero.initialize(tiny_gpt2(), _config(path=None))


def test_nonexistent_nvme_path_names_path_and_size(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SwapSetupError, match=rf"{missing} does not exist.*needs [0-9.]+ GiB \(\d+ bytes\)"):
        hf_zero.initialize(tiny_gpt2(), _config(path=missing))


def test_nvme_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SwapSetupError, match="is not a directory"):
        hf_zero.initialize(tiny_gpt2(), _config(path=tmp_path / "file"))


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no write can reach: mode 0555 for a normal user, a read-only tmpfs for root."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("root without permission to mount a read-only tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_read_only_nvme_path(read_only_dir):
    with pytest.raises(SwapSetupError, match=rf"{read_only_dir} is not writable"):
        hf_zero.initialize(tiny_gpt2(), _config(path=read_only_dir))


def test_insufficient_space_names_both_sizes(tmp_path, monkeypatch):
    import hf_zero.offload.swap_dir as swap_dir

    monkeypatch.setattr(swap_dir, "free_bytes", lambda path: 1000)
    with pytest.raises(SwapSetupError, match=r"too little space.*needs .* bytes\), 0\.000 GiB \(1000 bytes\) free"):
        hf_zero.initialize(tiny_gpt2(), _config(path=tmp_path))
    assert not list(tmp_path.iterdir())   # nothing left behind


@pytest.mark.parametrize("damage", ("removed", "truncated"))
def test_swap_file_damaged_mid_run_raises_and_never_continues(tmp_path, damage):
    engine = hf_zero.initialize(tiny_gpt2(), _config(path=tmp_path))
    _step(engine, 0)
    victim = sorted(next(tmp_path.iterdir()).iterdir())[1]
    if damage == "removed":
        victim.unlink()
    else:
        os.truncate(victim, ALIGN)
    with pytest.raises(SwapIOError, match=rf"{victim.name}"):
        _step(engine, 1)
    with pytest.raises(RuntimeError, match="unusable after an earlier error"):
        _step(engine, 2)
    with pytest.raises(RuntimeError, match="unusable"):
        engine.save_checkpoint(str(tmp_path / "ckpt"))
    engine.destroy()
    assert [p.name for p in tmp_path.iterdir()] in ([], ["ckpt"])


def test_swap_files_removed_at_normal_exit_without_destroy(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); import hf_zero, test_offload_local as t; "
            "e = hf_zero.initialize(t.tiny_gpt2(), t._config(path=%r)); t._step(e); "
            "import os; print(len(os.listdir(%r)))") % (str(HERE), str(tmp_path), str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip().splitlines()[-1] == "1"   # the swap directory existed during the run
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config,message", [
    (_config("cpu", stage=0), "needs stage 1, 2 or 3"),
    ({**_config("none"), "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "parameter offload needs stage 3"),
])
def test_unsupported_offload_configs_are_refused(config, message):
    with pytest.raises(ConfigError, match=message):
        hf_zero.initialize(tiny_gpt2(), config)


def test_non_adam_optimizer_is_refused_with_offload():
    model = tiny_gpt2()
    with pytest.raises(ConfigError, match="Adam/AdamW.*SGD"):
        hf_zero.initialize(model, _config("cpu"), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def _memory_run(device: str, swap: Path) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "offload_memory_case.py"), device, str(swap), "2"],
                         capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_nvme_offload_cuts_peak_rss_by_most_of_the_optimizer_state(tmp_path):
    # Two processes (peak RSS never decreases within one), the same 100.7M-parameter fp32 run;
    # two steps, so that both peaks are steady-state ones (the second step allocates transients).
    none, nvme = _memory_run("none", tmp_path), _memory_run("nvme", tmp_path)
    assert none["num_params"] >= 100_000_000
    assert nvme["losses"] == pytest.approx(none["losses"], rel=1e-5)
    saved = none["peak_rss_bytes"] - nvme["peak_rss_bytes"]
    assert saved >= 0.7 * none["optimizer_state_bytes"], (saved, none, nvme)
    assert list(tmp_path.iterdir()) == []


def test_gathered_parameters_edit_reaches_offloaded_masters(tmp_path, device="nvme"):
    # Stage 3, bf16 (separate fp32 masters): an edit under GatheredParameters(modifier_rank=0)
    # must reach the masters in their swap files (cpu shares the protocol's default path);
    # the reference is the same edit without offload.
    def run(dev: str) -> list[float]:
        model = tiny_gpt2()
        config = _config(dev, tmp_path, stage=3)
        config["bf16"] = {"enabled": True}
        engine = hf_zero.initialize(model, config)
        losses = [_step(engine, 0)]
        with hf_zero.GatheredParameters(model.lm_head.weight, modifier_rank=0), torch.no_grad():
            model.lm_head.weight.mul_(5.0)
        losses += [_step(engine, 1), _step(engine, 2)]
        engine.destroy()
        return losses

    reference, offloaded = run("none"), run(device)
    assert offloaded == pytest.approx(reference, rel=1e-5)
    assert reference[1] != pytest.approx(run_unedited(tmp_path), rel=1e-3)   # the edit mattered


def run_unedited(tmp_path) -> float:
    model = tiny_gpt2()
    config = _config("none", tmp_path, stage=3)
    config["bf16"] = {"enabled": True}
    engine = hf_zero.initialize(model, config)
    _step(engine, 0)
    loss = _step(engine, 1)
    engine.destroy()
    return loss


def test_forked_child_exit_leaves_the_parents_swap_files(tmp_path):
    # A DataLoader-style forked worker inherits the engine; its normal exit must not delete them.
    engine = hf_zero.initialize(tiny_gpt2(), _config(path=tmp_path))
    pid = os.fork()
    if pid == 0:   # child: a normal interpreter-level exit runs atexit finalizers
        import atexit

        atexit._run_exitfuncs()
        os._exit(0)
    os.waitpid(pid, 0)
    assert len(list(tmp_path.iterdir())) == 1
    _step(engine)   # the parent's state is intact
    engine.destroy()
    assert list(tmp_path.iterdir()) == []


def test_setup_removes_only_swap_dirs_whose_owner_is_gone(tmp_path, caplog):
    import hf_zero.offload.swap_dir as swap_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()   # reaped: os.kill(dead.pid, 0) raises ProcessLookupError
    me = os.getpid()

    def make(name: str, owner) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "sub_group_00000.bin").write_bytes(b"\1" * 3 * ALIGN)
        if owner is not None:
            (path / swap_dir.OWNER_FILE).write_text(json.dumps(owner))
        return path

    stale = make(f"hf_zero_swap_rank0_{dead.pid}_0badf00d", swap_dir.owner_record(dead.pid))
    # this pid is alive but started at another time: the owner died and its pid was reused
    reused = make(f"hf_zero_swap_rank1_{me}_0badf00e", {**swap_dir.owner_record(me), "start_time": 1})
    kept = [make(f"hf_zero_swap_rank0_{me}_0123abcd", swap_dir.owner_record(me)),   # alive: this process
            make(f"hf_zero_swap_rank2_{dead.pid}_00000001",                        # another host's
                 {**swap_dir.owner_record(dead.pid), "host": "other-host"}),
            make(f"hf_zero_swap_rank3_{dead.pid}_00000002",                        # another container's
                 {**swap_dir.owner_record(dead.pid), "pid_namespace": "pid:[1]"}),
            make(f"hf_zero_swap_rank4_{dead.pid}_00000003", None),                 # no owner record
            make(f"not_hf_zero_swap_{dead.pid}", swap_dir.owner_record(dead.pid))]
    with caplog.at_level("WARNING", logger="hf_zero.offload.swap_dir"):
        engine = hf_zero.initialize(tiny_gpt2(), _config(path=tmp_path))
    ours = [p for p in tmp_path.iterdir() if p not in kept]
    assert len(ours) == 1 and (ours[0] / swap_dir.OWNER_FILE).is_file()   # the new engine's, with its owner
    assert not stale.exists() and not reused.exists() and all(p.exists() for p in kept)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("removed stale swap directory" in w for w in warnings)
    named = [w for w in warnings if str(stale) in w]   # its size on disk: the file, the owner record
    assert len(named) == 1 and int(re.search(r"GiB, (\d+) bytes\)", named[0]).group(1)) >= 3 * ALIGN, named
    engine.destroy()
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_optimizer_state_dict_with_nvme_state_says_it_holds_placeholders(tmp_path):
    """torch.save of a 0-byte placeholder succeeds and torch.load then fails: the call warns."""
    engine = hf_zero.initialize(tiny_gpt2(), _config("nvme", tmp_path))
    _step(engine)
    with pytest.warns(UserWarning, match="engine.save_checkpoint"):
        engine.optimizer.state_dict()
    memory = hf_zero.initialize(tiny_gpt2(), _config("cpu"))
    _step(memory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory.optimizer.state_dict()   # host-resident states: no warning


def test_ratio_without_optimizer_offload_is_said_to_have_no_effect(caplog):
    with caplog.at_level("WARNING", logger="hf_zero.offload"):
        hf_zero.initialize(tiny_gpt2(), _config("none", ratio=0.5))
    assert any("offload_optimizer.ratio=0.5 has no effect" in r.getMessage() for r in caplog.records)
