"""``make gpu-check``: one command that proves hf_zero's CUDA, NCCL and compiled-Triton paths.

    python benchmarks/gpu_check.py                      # what `make gpu-check` runs
    python benchmarks/gpu_check.py --device cpu --quick [--world 2]   # CPU dry run of this script

With no CUDA device it prints that and exits 0 at once. With one it runs, in under 8
minutes (a time budget skips what is left, saying so), and prints one table:
Triton kernels compiled and checked against their torch references on the device; the
engine at world 1 for stages 0-3 x fp32/bf16 x offload none/cpu/nvme against plain torch,
with max_memory_allocated against ``hf-zero estimate``'s figure; a resume across
``fused_kernels`` modes; zero_init and from_pretrained; the Triton AdamW's throughput
against torch's fused AdamW; and, with two GPUs or more, the engine grid, zero_init and
from_pretrained again at world 2 under NCCL against DDP. Exit status 1 when any checked row
fails. docs/gpu.md walks through every case. ``--device cpu --quick`` runs a few cases of
each section on the CPU (Triton interpreted, gloo for ``--world 2``): it checks this script,
not the GPU paths; the test suite runs it so that it does not rot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

NO_CUDA = ("gpu-check: no CUDA device is present, so nothing was checked (the CUDA, NCCL and compiled-Triton "
           "paths need a GPU; see docs/gpu.md). Exiting 0.")
FULL_GRID = [(stage, bf16, off) for stage in (0, 1, 2, 3) for bf16 in (False, True)
             for off in (("none",) if stage == 0 else ("none", "cpu", "nvme"))]
# Partial optimizer offload ("device@ratio": the first sub-groups' states and update on the GPU).
FULL_GRID += [(2, True, "cpu@0.5"), (1, False, "nvme@0.3")]
QUICK_GRID = [(0, False, "none"), (3, True, "cpu")]


def _sections(device, quick: bool):
    """(name, thunk) per world-1 section, in the order they run."""
    import gpu_check_cases as cases
    import gpu_check_kernels as kernels

    grid = QUICK_GRID if quick else FULL_GRID
    pairs = [("triton", "auto")] if quick else [("triton", "auto"), ("auto", "triton"), ("off", "triton")]
    return [("Triton kernels", lambda: kernels.kernel_rows(device, quick)),
            ("engine grid, world 1", lambda: cases.engine_grid(device, quick, grid)),
            ("resume across fused_kernels", lambda: cases.resume_across_modes(device, quick, pairs)),
            ("zero_init / from_pretrained, world 1", lambda: cases.construction(device, quick)),
            ("AdamW throughput", lambda: kernels.throughput_rows(device, quick))]


def _run_sections(sections, deadline: float) -> list:
    from gpu_check_cases import Row

    rows = []
    for name, thunk in sections:
        if time.monotonic() > deadline:
            rows.append(Row(name, "-", "SKIPPED: time budget spent", "", None))
            continue
        try:
            rows.extend(thunk())
        except Exception as err:   # one broken section must not hide the others' results
            message = " ".join(str(err).split())[:200]
            rows.append(Row(name, "-", f"ERROR {type(err).__name__}: {message}", "", False))
    return rows


def _world2_rank(rank: int, port: int, use_cuda: bool, quick: bool, out: str, deadline: float) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE="2")
    if use_cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=2)
    import gpu_check_cases as cases

    grid = QUICK_GRID[-1:] if quick else [c for c in FULL_GRID if c[1]] + [(3, False, "none")]
    rows = _run_sections([("engine grid, world 2", lambda: cases.engine_grid(device, quick, grid)),
                          ("zero_init / from_pretrained, world 2", lambda: cases.construction(device, quick))],
                         deadline)
    if rank == 0:
        Path(out).write_text(json.dumps([r.__dict__ for r in rows]))
    dist.destroy_process_group()


def _run_world2(use_cuda: bool, quick: bool, deadline: float) -> list:
    import torch.multiprocessing as mp

    from gpu_check_cases import Row
    from hf_zero.testing import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        # Each section checks the deadline before it starts; the join waits a minute past it.
        context = mp.spawn(_world2_rank, args=(free_port(), use_cuda, quick, out, deadline), nprocs=2, join=False)
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline + 60:
                    for process in context.processes:
                        process.kill()
                    return [Row("world 2", "-", "KILLED: past the time budget", "", False)]
        except Exception as err:
            return [Row("world 2", "-", f"ERROR {type(err).__name__}: {str(err).splitlines()[-1][:150]}", "", False)]
        return [Row(**r) for r in json.loads(Path(out).read_text())]


def _print_table(rows, header: str) -> None:
    print(header)
    print("| check | case | result | figure | status |")
    print("|---|---|---|---|---|")
    for r in rows:
        status = "info" if r.ok is None else ("ok" if r.ok else "FAIL")
        print(f"| {r.check} | {r.case} | {r.result} | {r.figure} | {status} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the GPU, or exit 0 without one; cpu: a dry run of this script")
    parser.add_argument("--quick", action="store_true", help="a few cases per section, tiny sizes")
    parser.add_argument("--world", type=int, choices=(1, 2), default=None,
                        help="also run the world-2 section (default: when two GPUs exist)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="sections starting later are skipped")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is first imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "auto" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    use_cuda = args.device == "auto"
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    world2 = args.world == 2 if args.world is not None else use_cuda and torch.cuda.device_count() >= 2
    deadline = start + args.budget_s
    rows = _run_sections(_sections(device, args.quick), deadline)
    if world2:
        if use_cuda:
            torch.cuda.empty_cache()   # rank 0 shares cuda:0 with this process
        rows += _run_world2(use_cuda, args.quick, deadline)
    name = torch.cuda.get_device_name(device) if use_cuda else "CPU (dry run: Triton interpreted, gloo)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed (pip install 'hf_zero[kernels]')"
    _print_table(rows, f"gpu-check on {name}; torch {torch.__version__}, triton {triton_version}; "
                       f"{time.monotonic() - start:.0f} s; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
