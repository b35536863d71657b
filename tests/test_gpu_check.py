"""``make gpu-check`` on a machine without CUDA, and its CPU dry run (so the script does not
rot between the rare GPU runs; the dry run checks the script, not the GPU paths)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)   # the script sets it itself for --device cpu
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_without_cuda_it_says_so_and_exits_0_in_seconds():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real check would run")
    start = time.monotonic()
    result = _run(timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device is present" in result.stdout
    assert "|" not in result.stdout   # no table: nothing was checked
    assert time.monotonic() - start < 60   # torch's import dominates (seconds; this machine is shared)


def test_cpu_dry_run_prints_every_section_and_passes():
    pytest.importorskip("triton")
    result = _run("--device", "cpu", "--quick", "--world", "2", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    checks = {r[0].strip() for r in rows}
    assert {"Triton vs torch reference", "engine vs torch", "resume across fused_kernels", "zero_init",
            "from_pretrained", "AdamW throughput", "engine vs DDP (gloo)"} <= checks, checks
    assert len([r for r in rows if r[0].strip() == "Triton vs torch reference"]) == 8
    assert all(r[-1].strip() in ("ok", "info") for r in rows), result.stdout
    assert sum(1 for r in rows if "world 2" in r[1]) == 3   # engine row, zero_init, from_pretrained
