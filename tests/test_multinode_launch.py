"""Issue 18 (items 1 and 3) without launching anything: torchrun's multi-node options and their
accelerate / DeepSpeed spellings, SLURM, the dry run of every node, the lost-rank check and
the choice of checkpoint after a restart. The launches are in integration_tests/test_multinode.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from hf_zero.cli import main
from hf_zero.integrations import fault
from hf_zero.integrations import launch as launch_module
from hf_zero.integrations.multinode import NodeOptions, expand_nodelist, from_slurm

CONFIG = '{"zero_optimization": {"stage": 2}}'
SLURM = {"SLURM_JOB_NODELIST": "gpu[08-09],cpu1", "SLURM_NNODES": "3", "SLURM_NODEID": "1"}


@pytest.fixture
def script(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_module, "_cuda_available", lambda: False)
    for key in SLURM:
        monkeypatch.delenv(key, raising=False)
    path = tmp_path / "train.py"
    path.write_text("")
    return str(path)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("gpu[8-9,12],login-a", ["gpu8", "gpu9", "gpu12", "login-a"]),
    ("r[1-2]n[07-08]", ["r1n07", "r1n08", "r2n07", "r2n08"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def _launcher_args(capsys) -> str:
    return capsys.readouterr().out.split("torch.distributed.run", 1)[1].split("-m hf_zero")[0].split()


def test_one_node_stays_standalone_and_takes_max_restarts(script, capsys):
    assert main(["launch", "--dry-run", "--config", CONFIG, "--nproc", "2", "--max-restarts", "3", script]) == 0
    out = capsys.readouterr().out
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in out   # a store per attempt (fault.py, multinode.py)
    assert out.split("torch.distributed.run", 1)[1].split("-m hf_zero")[0].split() == [
        "--standalone", "--max-restarts", "3", "--nproc_per_node", "2"]


def test_torchrun_multi_node_options_pass_through(script, capsys):
    assert main(["launch", "--dry-run", "--config", CONFIG, "--nproc", "2", "--nnodes", "2", "--node-rank", "1",
                 "--master-addr", "10.0.0.1", "--master-port", "29400", script, "--lr", "1"]) == 0
    assert _launcher_args(capsys) == ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                                      "--master-port", "29400", "--nproc_per_node", "2"]
    assert main(["launch", "--dry-run", "--config", CONFIG, "--nnodes", "1:4", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", "h:29400", "--rdzv-id", "job7", "--max-restarts", "2", script]) == 0
    assert _launcher_args(capsys) == ["--nnodes", "1:4", "--rdzv-backend", "c10d", "--rdzv-endpoint", "h:29400",
                                      "--rdzv-id", "job7", "--max-restarts", "2", "--nproc_per_node", "1"]


def test_deepspeed_launcher_spellings_map(script, capsys):
    assert main(["launch", "--dry-run", "--config", CONFIG, "--num_gpus", "2", "--num_nodes", "2", "--node_rank",
                 "0", "--master_addr", "h0", "--master_port", "1234", script]) == 0
    assert _launcher_args(capsys) == ["--nnodes", "2", "--node-rank", "0", "--master-addr", "h0", "--master-port",
                                      "1234", "--nproc_per_node", "2"]


@pytest.mark.parametrize("options, message", [
    (["--nnodes", "2", "--master-addr", "h"], "needs --node-rank"),
    (["--nnodes", "2", "--node-rank", "0"], "needs --master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2 is outside 0..1"),
    (["--nnodes", "2", "--node-rank", "0", "--master-addr", "h", "--max-restarts", "1"], "needs the c10d rendezvous"),
])
def test_incomplete_static_rendezvous_is_refused(script, capsys, options, message):
    assert main(["launch", "--dry-run", "--config", CONFIG, *options, script]) == 2
    assert message in capsys.readouterr().err


def test_slurm_fills_the_options_and_the_dry_run_shows_every_node(script, capsys, monkeypatch):
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    assert main(["launch", "--dry-run", "--config", CONFIG, "--nproc", "4", script]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line for line in lines if line.startswith("#")] == ["# node 0 (gpu08)", "# node 1 (gpu09) <- this node",
                                                                "# node 2 (cpu1)"]
    commands = [line for line in lines if not line.startswith("#")]
    for rank, command in enumerate(commands):
        assert (f"--nnodes 3 --node-rank {rank} --master-addr gpu08 --master-port 29500 --nproc_per_node 4"
                in command)
    options, hosts = from_slurm(NodeOptions(master_port=1), SLURM)
    assert options.node_rank == 1 and options.master_port == 1 and hosts == ["gpu08", "gpu09", "cpu1"]
    assert from_slurm(NodeOptions(nnodes="1"), SLURM) == (NodeOptions(nnodes="1"), [])   # given options win
    with pytest.raises(ValueError, match="names 3 hosts but SLURM_NNODES=2"):
        from_slurm(NodeOptions(), {**SLURM, "SLURM_NNODES": "2"})


def _accelerate_yaml(tmp_path, **top) -> str:
    data = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_machines": 1,
            "num_processes": 2, "mixed_precision": "no", "deepspeed_config": {"zero_stage": 2}, **top}
    path = tmp_path / "acc.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_accelerate_route_gets_accelerate_spellings(script, capsys, tmp_path):
    acc = _accelerate_yaml(tmp_path)
    assert main(["launch", "--dry-run", "--config", acc, "--nnodes", "2", "--node-rank", "1", "--master-addr", "h0",
                 "--master-port", "1234", script]) == 0
    command = capsys.readouterr().out.split("accelerate.commands.launch", 1)[1].split()
    options = command[2:command.index("-m")]
    assert options == ["--num_machines", "2", "--num_processes", "4", "--machine_rank", "1", "--main_process_ip",
                       "h0", "--main_process_port", "1234"]
    assert main(["launch", "--dry-run", "--config", acc, "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", "h0:1234", "--max-restarts", "1", script]) == 0
    out = capsys.readouterr().out
    command = out.split("accelerate.commands.launch", 1)[1].split()
    options = command[2:command.index("-m")]
    assert options == ["--num_machines", "2", "--num_processes", "4", "--machine_rank", "1", "--main_process_ip",
                       "h0", "--main_process_port", "1234", "--rdzv_backend", "c10d", "--max_restarts", "1"]
    assert out.startswith("HF_ZERO_CONFIG=") and " TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 " in out
    assert main(["launch", "--dry-run", "--config", acc, "--nnodes", "2", "--rdzv-endpoint", "h:1",
                 "--rdzv-id", "x", script]) == 2
    assert "--rdzv-id has no accelerate spelling" in capsys.readouterr().err


def test_accelerate_deepspeed_yaml_with_several_machines_is_launched(script, tmp_path):
    """num_machines > 1 was refused before issue 18; now accelerate's torchrun launcher gets it."""
    acc = _accelerate_yaml(tmp_path, num_machines=2, num_processes=4, machine_rank=1, main_process_ip="h0",
                           main_process_port=1234, deepspeed_config={"zero_stage": 2,
                                                                     "deepspeed_multinode_launcher": "pdsh"})
    with pytest.warns(UserWarning, match="deepspeed_multinode_launcher is ignored"):
        command, _ = launch_module.build_command(acc, None, script, [], str(tmp_path))
    handed = yaml.safe_load((tmp_path / "accelerate_config.yaml").read_text())
    assert {key: handed[key] for key in ("num_machines", "num_processes", "machine_rank", "main_process_ip",
                                         "distributed_type")} == {"num_machines": 2, "num_processes": 4,
                                                                  "machine_rank": 1, "main_process_ip": "h0",
                                                                  "distributed_type": "MULTI_GPU"}
    launch_module.build_command(acc, 3, script, [], str(tmp_path))   # --nproc counts this node's processes
    assert yaml.safe_load((tmp_path / "accelerate_config.yaml").read_text())["num_processes"] == 6


def _checkpoint(root, step: int, state: str = "{}", latest: str | None = "global_step", tag_dir: bool = True):
    path = root / f"checkpoint-{step}"
    (path / "hf_zero").mkdir(parents=True)
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    if latest is not None:
        (path / "hf_zero" / "latest").write_text(f"{latest}{step}")
        if tag_dir:
            (path / "hf_zero" / f"{latest}{step}").mkdir()
    return str(path)


def test_last_complete_checkpoint_skips_unfinished_ones(tmp_path):
    assert fault.last_complete_checkpoint(str(tmp_path / "missing")) is None
    complete = _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, state=None)        # trainer_state.json not written yet
    _checkpoint(tmp_path, 14, state='{"glo')     # torn
    _checkpoint(tmp_path, 16, latest=None)       # the engine's 'latest' not written yet
    _checkpoint(tmp_path, 18, tag_dir=False)     # 'latest' names nothing
    assert fault.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert complete != fault.last_complete_checkpoint(str(tmp_path))


def test_restart_resumes_only_after_a_restart(tmp_path, monkeypatch):
    seen = []

    class Base:
        args = type("Args", (), {"output_dir": str(tmp_path)})()

        def train(self, resume_from_checkpoint=None):
            seen.append(resume_from_checkpoint)

    class Patched(fault.ResumeAfterRestartMixin, Base):
        pass

    found = _checkpoint(tmp_path, 6)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    Patched().train()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    Patched().train()
    Patched().train(resume_from_checkpoint="mine")   # the script's own choice wins
    assert seen == [None, found, "mine"]


def test_process_alive_sees_exits_and_zombies():
    assert fault._process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while fault._process_alive(child.pid) and time.monotonic() < deadline:   # exited, not yet reaped: a zombie
        time.sleep(0.05)
    assert not fault._process_alive(child.pid)
    child.wait()
    assert not fault._process_alive(child.pid)


def test_lost_rank_is_named(monkeypatch):
    """A survivor's failed collective becomes LostRankError naming the dead rank: a local one by
    its process, a remote one by its heartbeat, rank 0 when the store it hosts is gone; an
    error with every peer alive is left alone."""
    import socket

    import torch.distributed as dist

    here = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    liveness = fault._Liveness()
    liveness.store, liveness.rank, liveness.world = dist.HashStore(), 0, 3
    for rank, pid in ((1, os.getpid()), (2, dead.pid)):   # published, not yet read by the beat thread
        liveness.store.set(f"who/{rank}", json.dumps([here, pid]))
    monkeypatch.setattr(fault, "_LIVENESS", liveness)
    monkeypatch.setattr(fault, "STALE_AFTER", 0.2)
    with pytest.raises(fault.LostRankError, match=r"rank 0 of 3: lost peer rank 2 \(pid \d+ on .*, exited\)"):
        fault.reraise_naming_lost_rank(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    assert [text.split(" (")[0] for text in liveness.lost_ranks(wait=False)] == ["rank 2"]   # the SIGTERM path
    liveness.roster[2] = ("another-host", 1)   # remote: judged by its heartbeat
    liveness.store.add("beat/2", 1)
    with pytest.raises(fault.LostRankError, match=r"lost peer rank 2 \(on another-host, no heartbeat"):
        fault.reraise_naming_lost_rank(RuntimeError("timed out"))

    class GoneStore:
        def add(self, key, value):
            raise RuntimeError("Connection reset by peer")

    liveness.store, liveness.rank, liveness.roster = GoneStore(), 1, {0: ("another-host", 1)}
    with pytest.raises(fault.LostRankError, match=r"lost peer rank 0 \(the process group's store"):
        fault.reraise_naming_lost_rank(RuntimeError("Connection reset by peer"))
    liveness.store, liveness.rank, liveness.world, liveness.roster = dist.HashStore(), 0, 2, {1: (here, os.getpid())}
    fault.reraise_naming_lost_rank(RuntimeError("some other failure"))   # returns: nothing to name
