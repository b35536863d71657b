"""Offload throughput: CPU AdamW, NVMe swap I/O, and step time with offload (one run, one table each).

    python benchmarks/offload.py [--numel 50000000] [--swap-dir /tmp] [--swap-gib 2] [--reps 2]
                                 [--deepspeed-path /tmp/ds_pkgs]

(a) CPU AdamW in parameters/s over ``--numel`` fp32 parameters (median of ``--iters`` steps
after a warm-up, every contender once per round in a rotating order): hf_zero's sub-group
update (offload/cpu_adam.py over sub-groups), the whole ``CpuOffload.step`` (gradient
pass + update) for unscale x clip coefficients c = 1, 0.5 (a power of two: 2 ranks,
clipping not triggered) and 0.37 (clipping triggered), each with the coefficient folded
([Note: folding the coefficient]) and with the old separate multiply pass
(``fold_coefficient = False``), torch.optim.AdamW default / foreach / fused, and
DeepSpeedCPUAdam when DeepSpeed is importable from ``--deepspeed-path`` (a ``pip install
--target`` directory; its cpu_adam op is JIT-compiled on first use). "x limit" is the rate
over the bandwidth limit: an fp32 AdamW update must move 28 bytes per parameter (read
param, grad, m, v; write param, m, v), divided into the in-place streaming bandwidth
(``buf.mul_(c)`` of an fp32 buffer of 3.5 x ``--numel`` elements, as many bytes as one
AdamW step, counting read + write), itself measured as one of the interleaved
contenders. "bytes" is what each contender moves per parameter.

(b) NVMe swap: hf_zero's swapper (swapper.py: O_DIRECT, 8 MiB requests on 4 threads, one file
per sub-group, write i overlapped with the fill of i+1 as in the step) against the
sequential bandwidth of the same filesystem (one thread, O_DIRECT, 64 MiB requests, one
file), ``--swap-gib`` GiB each way.

(c) Step time of the 100.7M-parameter fp32 model of tests/offload_memory_case.py (stage 1,
one rank, 64 rows per batch) with offload none / cpu / nvme, each in its own process,
plus cpu with the old multiply pass, interleaved ``--reps`` times; median over steps 2.. of
each process, with peak RSS, the optimizer step (norm, update, all-gather) and, inside it,
the offload backend's update (gradient pass, Adam, write-back). That update runs after
backward and overlaps nothing, so all of it is exposed: "exposed update share" is the
median over steps of update / step (min-max in brackets). See docs/offload.md for why it
cannot start during backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hf_zero.offload.cpu import CpuOffload  # noqa: E402
from hf_zero.offload.swap_dir import SwapDir  # noqa: E402
from hf_zero.offload.swapper import AsyncFileIO, aligned_buffer  # noqa: E402

ADAM_BYTES = 28
HYPER = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def stream_contender(numel: int) -> tuple:
    """(fn, bytes moved): an in-place scale of an fp32 buffer moving as many bytes (read +
    write) as one AdamW step over ``numel`` parameters, so it spans as long a stretch and as
    few parallel regions as the contenders do (a shorter op loses relatively more to other
    processes' load at its closing barrier)."""
    buf = torch.rand(numel * ADAM_BYTES // 8)
    return (lambda: buf.mul_(1.0000001)), 2 * buf.numel() * 4


def adam_contenders(numel: int, sub_group_sizes: tuple[int, ...], coefficients: tuple[float, ...]) -> dict:
    """name -> (setup or None, one optimizer step over ``numel`` fp32 parameters, bytes/param)."""
    from hf_zero.offload.cpu_adam import adam_update
    from hf_zero.offload.grad_pass import exact_reciprocal

    out = {}
    for size in sub_group_sizes:
        param = torch.randn(numel)
        grad = torch.randn(numel) * 1e-3
        fresh = grad.clone()
        offload = CpuOffload([[param]], size, pin_memory=False)
        inner = torch.optim.AdamW([offload.masters.masters[0][0]], **HYPER)
        offload.attach(inner)
        state = inner.state[param]

        def update_only(offload=offload, inner=inner, state=state, param=param, grad=grad) -> None:
            for sg in offload.plan:
                sl = [(s.start, s.length) for s in sg.slices]
                adam_update(inner, inner.param_groups[0], [param.narrow(0, a, n) for a, n in sl],
                            [grad.narrow(0, a, n) for a, n in sl],
                            {k: [state[k].narrow(0, a, n) for a, n in sl] for k in offload.state_keys}, 1.0)

        out[f"hf_zero sub-group update ({size:.0e})"] = (None, update_only, ADAM_BYTES)
        for c in coefficients:
            for fold in (True, False):
                # The step scales the gradient in place (as the 'none' backend does): each
                # timed step starts from the same gradient, restored untimed.
                def whole_step(offload=offload, grad=grad, c=torch.tensor([c]), fold=fold) -> None:
                    offload.fold_coefficient = fold
                    offload.step([[grad]], c)

                moved = ADAM_BYTES + (0 if fold and c == 1 else 4 if fold and exact_reciprocal(c) else 8)
                label = "folded" if fold else "old: separate multiply pass"
                out[f"hf_zero CpuOffload.step, c={c:g}, {label} ({size:.0e})"] = (
                    lambda grad=grad, fresh=fresh: grad.copy_(fresh), whole_step, moved)
    for name, impl in (("torch AdamW default", {}), ("torch AdamW foreach", {"foreach": True}),
                       ("torch AdamW fused", {"fused": True})):
        p = torch.nn.Parameter(torch.randn(numel))
        p.grad = torch.randn(numel) * 1e-3
        out[name] = (None, torch.optim.AdamW([p], **HYPER, **impl).step, ADAM_BYTES)
    return out


def interleaved_times(contenders: dict, iters: int) -> dict[str, list[float]]:
    """Seconds per call of each contender ``(setup or None, fn)``: every round runs each
    once, in a rotating order, so that load from other processes falls on all of them
    alike; ``setup`` runs untimed just before ``fn``."""
    for setup, fn in contenders.values():   # warm-up: lazily created state
        if setup:
            setup()
        fn()
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            setup, fn = contenders[name]
            if setup:
                setup()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


DS_SNIPPET = """
import statistics, time, torch
from deepspeed.ops.adam import DeepSpeedCPUAdam
p = torch.nn.Parameter(torch.randn({numel})); p.grad = torch.randn({numel}) * 1e-3
opt = DeepSpeedCPUAdam([p], lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adamw_mode=True)
opt.step(); ts = []
for _ in range({iters}):
    s = time.perf_counter(); opt.step(); ts.append(time.perf_counter() - s)
print("RATE", {numel} / statistics.median(ts))
"""


def deepspeed_rate(numel: int, iters: int, path: str | None) -> tuple[float | None, str]:
    if not path or not Path(path).is_dir():
        return None, "not installed (pass --deepspeed-path)"
    env = {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0"}
    try:
        out = subprocess.run([sys.executable, "-c", DS_SNIPPET.format(numel=numel, iters=iters)], env=env,
                             capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "timed out building/running cpu_adam"
    rates = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("RATE")]
    if out.returncode != 0 or not rates:
        last = (out.stderr.strip().splitlines() or ["?"])[-1][:120]
        return None, f"failed: {last}"
    return float(rates[0]), "JIT-compiled cpu_adam"


def sequential_bandwidth(directory: Path, total: int) -> tuple[float, float]:
    """(write, read) bytes/s: one file, one thread, O_DIRECT, 64 MiB requests."""
    block = 64 * 1024 * 1024
    buf = aligned_buffer(block)
    buf.copy_(torch.randint(0, 256, (block,), dtype=torch.uint8))
    view = memoryview(buf.numpy()).cast("B")
    path = directory / "hf_zero_seq_bench.bin"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT, 0o600)
    start = time.perf_counter()
    for offset in range(0, total, block):
        os.pwritev(fd, [view], offset)
    os.fsync(fd)
    write = total / (time.perf_counter() - start)
    os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    start = time.perf_counter()
    for offset in range(0, total, block):
        os.preadv(fd, [view], offset)
    read = total / (time.perf_counter() - start)
    os.close(fd)
    path.unlink()
    return write, read


def swapper_bandwidth(directory: Path, total: int, file_bytes: int = 256 * 1024 * 1024) -> tuple[float, float]:
    """(write, read) bytes/s of hf_zero's swapper over sub-group-sized files, two buffers
    alternating as in the step (transfer i in flight while i+1 is prepared)."""
    swap = SwapDir(directory, 0)
    io = AsyncFileIO()
    buffers = [aligned_buffer(file_bytes) for _ in range(2)]
    for b in buffers:
        b.copy_(torch.randint(0, 256, (file_bytes,), dtype=torch.uint8))
    files = [swap.allocate(f"sg{i}", file_bytes) for i in range(total // file_bytes)]
    results = []
    for op in (io.write, io.read):
        start = time.perf_counter()
        pending = [None, None]
        for i, f in enumerate(files):
            if pending[i % 2] is not None:
                pending[i % 2].wait()
            pending[i % 2] = op(f, buffers[i % 2], file_bytes)
        for p in pending:
            if p is not None:
                p.wait()
        if op == io.write:
            os.sync()   # O_DIRECT bypasses the cache already; count any metadata too
        results.append(len(files) * file_bytes / (time.perf_counter() - start))
    io.close()
    swap.remove()
    return results[0], results[1]


STEP_KINDS = {"none": ("none", 1), "cpu": ("cpu", 1), "cpu (old multiply pass)": ("cpu", 0), "nvme": ("nvme", 1)}


def step_times(swap: str, reps: int, steps: int, rows: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {kind: [] for kind in STEP_KINDS}
    script = ROOT / "tests" / "offload_memory_case.py"
    for _ in range(reps):
        for kind, (device, fold) in STEP_KINDS.items():
            out = subprocess.run([sys.executable, str(script), device, swap, str(steps), "5000000", str(rows),
                                  str(fold)], capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=50_000_000)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--swap-dir", default=tempfile.gettempdir())
    parser.add_argument("--swap-gib", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--deepspeed-path", default=None)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: adam,swap,step")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores\n")

    if "adam" not in skip:
        stream, stream_bytes = stream_contender(args.numel)
        contenders = adam_contenders(args.numel, (1_000_000_000, 10_000_000), (1.0, 0.5, 0.37))
        measured = interleaved_times({"stream": (None, stream), **{n: c[:2] for n, c in contenders.items()}},
                                     args.iters)
        bandwidths = [stream_bytes / t for t in measured.pop("stream")]
        bandwidth = statistics.median(bandwidths)
        limit = bandwidth / ADAM_BYTES
        print(f"(a) CPU AdamW, {args.numel / 1e6:.0f}M fp32 parameters; in-place streaming bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s ({min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f}, interleaved) "
              f"-> limit {limit / 1e6:.0f} Mparam/s (28 B/param)\n")
        ds, note = deepspeed_rate(args.numel, args.iters, args.deepspeed_path)
        rates = {name: [args.numel / t for t in ts] for name, ts in measured.items()}
        fused = statistics.median(rates["torch AdamW fused"])
        print(f"median of {args.iters} interleaved steps each, min-max\n")
        print("| implementation | bytes/param | Mparam/s | spread | x limit | x torch fused |\n"
              "|---|---|---|---|---|---|")
        for name, rs in rates.items():
            rate = statistics.median(rs)
            print(f"| {name} | {contenders[name][2]} | {rate / 1e6:.0f} | {min(rs) / 1e6:.0f}-{max(rs) / 1e6:.0f} | "
                  f"{rate / limit:.2f} | {rate / fused:.2f} |")
        if ds is None:
            print(f"| DeepSpeedCPUAdam | 28 | - | - | - | - ({note}) |")
        else:
            print(f"| DeepSpeedCPUAdam ({note}, one round) | 28 | {ds / 1e6:.0f} | - | {ds / limit:.2f} | "
                  f"{ds / fused:.2f} |")
        # Paired within each round (the two ran back to back), which cancels slow drifts of load.
        print("\nfolded / old multiply pass, speed ratio per round: median (min-max)\n")
        print("| whole step | ratio | spread |\n|---|---|---|")
        for name in rates:
            if ", folded" in name:
                old = name.replace("folded", "old: separate multiply pass")
                paired = [a / b for a, b in zip(rates[name], rates[old])]
                print(f"| {name.replace(', folded', '')} | {statistics.median(paired):.2f} | "
                      f"{min(paired):.2f}-{max(paired):.2f} |")
        print()

    if "swap" not in skip:
        directory = Path(args.swap_dir)
        total = int(args.swap_gib * 1024 ** 3) // (256 * 1024 * 1024) * (256 * 1024 * 1024)
        seq_w, seq_r = sequential_bandwidth(directory, total)
        sw_w, sw_r = swapper_bandwidth(directory, total)
        print(f"(b) NVMe swap, {total / 1024 ** 3:.1f} GiB each way under {directory}\n")
        print("| | write GB/s | read GB/s |\n|---|---|---|")
        print(f"| sequential (1 thread, O_DIRECT, 64 MiB) | {seq_w / 1e9:.2f} | {seq_r / 1e9:.2f} |")
        print(f"| hf_zero swapper (256 MiB sub-group files) | {sw_w / 1e9:.2f} | {sw_r / 1e9:.2f} |")
        print(f"| ratio | {sw_w / seq_w:.2f} | {sw_r / seq_r:.2f} |\n")

    if "step" not in skip:
        runs = step_times(args.swap_dir, args.reps, args.steps, args.rows)

        def med(values: list[float]) -> float:
            return statistics.median(values)

        base = med([t for r in runs["none"] for t in r["step_s"][1:]])
        norms = [n for rs in runs.values() for r in rs for n in r["grad_norms"]]
        print(f"(c) 100.7M-parameter fp32 model, stage 1, 1 rank, {args.rows} rows; {args.reps} interleaved "
              f"processes x {args.steps - 1} timed steps each; gradient norms {min(norms):.3g}-{max(norms):.3g} "
              f"(clipping at 1.0 {'never' if max(norms) < 1 else 'sometimes'} triggered)\n")
        print("| offload | step s (median) | spread | x none | optimizer step s | update s | "
              "exposed update share | peak RSS GiB |\n|---|---|---|---|---|---|---|---|")
        for kind, rs in runs.items():
            steps = [t for r in rs for t in r["step_s"][1:]]
            opt = [t for r in rs for t in r["optimizer_s"][1:]]
            update = [t for r in rs for t in r["update_s"][1:]]
            shares = [u / t for r in rs for u, t in zip(r["update_s"][1:], r["step_s"][1:])]
            rss = max(r["peak_rss_bytes"] for r in rs) / 1024 ** 3
            share = f"{med(shares):.0%} ({min(shares):.0%}-{max(shares):.0%})" if shares else "-"
            print(f"| {kind} | {med(steps):.2f} | {min(steps):.2f}-{max(steps):.2f} | {med(steps) / base:.2f} | "
                  f"{med(opt):.2f} | {med(update) if update else float('nan'):.2f} | {share} | {rss:.2f} |")


if __name__ == "__main__":
    main()
