"""Issue 18 (items 1 and 3) through the real launchers, on this machine.

- Two simulated nodes: two ``hf-zero launch --nnodes 2 --node-rank {0,1} --master-addr
  127.0.0.1 --nproc 2`` run the unmodified stock Trainer script together (world 4, stage 3)
  and match the same script under plain torchrun DDP on 4 processes (fp32, rtol 1e-5).
- A lost rank: under ``hf-zero launch --max-restarts 1`` rank 1 SIGKILLs itself after the
  step-4 checkpoint; the survivor's error names rank 1, torchrun restarts the group, the
  bootstrap's Trainer resumes from checkpoint-4 and the run ends with parameters bit-identical
  to an uninterrupted run that resumed from the same checkpoint.

Each launch pays the process start-up (about 10 s a process here); wall times are printed
(``pytest -s``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "integration_tests" / "scripts"
BIN = Path(sys.executable).parent
TIMEOUT = 300
CONFIG = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}
TRAINER_ARGS = ["--max_steps", "6", "--logging_steps", "1", "--adam_epsilon", "1e-6", "--report_to", "none",
                "--seed", "0", "--dataloader_drop_last", "--per_device_train_batch_size", "2",
                "--per_device_eval_batch_size", "2", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--use_cpu"]


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _finish(name: str, process: subprocess.Popen, started: float) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{name}: still running after {TIMEOUT} s\n{err[-4000:]}")
    print(f"{name}: {time.monotonic() - started:.1f} s")
    assert process.returncode == 0, f"{name} failed ({process.returncode})\n{out[-2000:]}\n{err[-6000:]}"
    return out, err


def _run(name: str, command: list) -> tuple[str, str]:
    started = time.monotonic()
    process = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=_env())
    return _finish(name, process, started)


def _losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "results.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multinode") / "zero3.json"
    path.write_text(json.dumps(CONFIG))
    return path


def test_two_nodes_run_one_stock_trainer_script_like_ddp(tmp_path, config_file):
    script, port = SCRIPTS / "stock_trainer.py", _free_port()
    started, nodes = time.monotonic(), []
    for node in range(2):   # each "node" has its own output folder, as without a shared file system
        command = [BIN / "hf-zero", "launch", "--config", config_file, "--nnodes", "2", "--node-rank", node,
                   "--master-addr", "127.0.0.1", "--master-port", port, "--nproc", "2", script,
                   "--output_dir", tmp_path / f"node{node}", "--save_strategy", "no", *TRAINER_ARGS]
        nodes.append(subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=_env()))
    ranks = []
    for node, process in enumerate(nodes):
        _, err = _finish(f"node {node} of 2 (hf-zero launch)", process, started)
        summaries = [json.loads(line.split("hf_zero summary: ", 1)[1]) for line in err.splitlines()
                     if line.startswith("hf_zero summary: ")]
        assert {s["world_size"] for s in summaries} == {4} and {s["stage"] for s in summaries} == {3}, err[-4000:]
        ranks.append(sorted(s["rank"] for s in summaries))
    assert ranks == [[0, 1], [2, 3]]   # one group of 4 over both "nodes", sharded by hf_zero
    _run("DDP reference (torchrun, 4 processes)", [BIN / "torchrun", "--standalone", "--nproc_per_node", "4",
                                                   SCRIPTS / "run_and_teardown.py", script,
                                                   "--output_dir", tmp_path / "ddp", "--save_strategy", "no",
                                                   *TRAINER_ARGS])
    got, expected = _losses(tmp_path / "node0"), _losses(tmp_path / "ddp")
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}: {got[step]} vs {expected[step]}"


def test_lost_rank_restarts_and_resumes_from_the_last_checkpoint(tmp_path, config_file):
    script, faulty, reference = SCRIPTS / "restart_trainer.py", tmp_path / "faulty", tmp_path / "reference"
    save = ["--save_strategy", "steps", "--save_steps", "2"]
    out, err = _run("rank 1 killed after checkpoint-4, --max-restarts 1", [
        BIN / "hf-zero", "launch", "--config", config_file, "--nproc", "2", "--max-restarts", "1", script,
        "--output_dir", faulty, "--kill_at_step", "4", *save, *TRAINER_ARGS])
    named = err.find("lost peer rank 1 (")
    resumed = err.find(f"hf_zero: restart 1: resuming from {faulty / 'checkpoint-4'}")
    assert named >= 0, f"no survivor named the lost rank:\n{err[-6000:]}"
    assert resumed > named, f"no resume from checkpoint-4 after the error:\n{err[-6000:]}"
    # the first attempt logged steps 1-4, the restarted one 5-6 (from the start it would log 1-6 again)
    assert out.count("'loss'") == 6, out
    _run("uninterrupted run resumed from the same checkpoint", [
        BIN / "hf-zero", "launch", "--config", config_file, "--nproc", "2", script, "--output_dir", reference,
        "--resume_from_checkpoint", faulty / "checkpoint-4", *save, *TRAINER_ARGS])
    got, expected = load_file(faulty / "model.safetensors"), load_file(reference / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert _losses(faulty) == _losses(reference)
