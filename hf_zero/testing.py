"""Run a function on N local gloo processes and collect each rank's result.

Used by the test suite and benchmarks (spawn once, run many cases inside). Always
terminates: a rank that raises fails the whole run with its traceback, and a run that
exceeds ``timeout_s`` kills every process.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, results: Any, args_pickle: bytes,
            threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    import torch
    import torch.distributed as dist

    _exit_with_parent()
    try:
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        # Plain pickle keeps tensors in-band: torch's queue pickler would share their storage
        # through file descriptors that vanish when this process exits.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *pickle.loads(args_pickle)))))
    except BaseException:  # report everything (before tearing down the group, so the root
        results.put((rank, False, traceback.format_exc()))  # cause arrives first)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _failure_report(rank: int, trace: str, results: Any, grace_s: float = 3.0) -> str:
    """The first failure plus any other rank's failure arriving within ``grace_s`` (a rank
    that lost its peer often reports a connection error; the root cause is listed too)."""
    failures = {rank: trace}
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            other, ok, value = results.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue_module.Empty:
            break
        if not ok:
            failures[other] = value
    return "\n".join(f"rank {r} failed:\n{t}" for r, t in sorted(failures.items()))


def _exit_with_parent() -> None:
    """A rank must not outlive the process that spawned it (killed runner, Ctrl-C)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="hf_zero-parent-watch").start()


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 600,
                 threads: int | None = None) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes sharing a gloo
    group; return the results ordered by rank. ``fn`` must be importable (module level)."""
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout_s, threads)
        except RuntimeError as err:
            # The free port was taken by another process before rank 0 bound it: the group
            # never formed and ``fn`` never ran, so launching again on a new port is safe.
            if "ddress already in use" not in str(err) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_once(fn: Callable, world_size: int, args: tuple, timeout_s: float, threads: int | None) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    # Arguments travel as plain pickles too: torch's spawn pickler would share tensor storage
    # with the children, which could then modify the caller's tensors in place.
    payload = pickle.dumps(args)
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, results, payload, threads), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(collected))} did not finish "
                                   f"within {timeout_s:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 5.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in collected]
                if dead and results.empty():
                    raise RuntimeError(f"rank(s) {dead} exited without a result "
                                       f"(exit codes {[procs[r].exitcode for r in dead]})") from None
                continue
            if not ok:
                raise RuntimeError(_failure_report(rank, value, results))
            collected[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [collected[r] for r in range(world_size)]
