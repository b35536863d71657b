"""Peak memory and time of ``hf-zero import-deepspeed`` on a DeepSpeed checkpoint.

Make the checkpoint with DeepSpeed (a separate virtual environment, see tests/fixtures/
make_deepspeed_checkpoints.py), then run this with hf_zero's Python:
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/_deepspeed_checkpoint.py 100M /tmp/ds
    python benchmarks/import_deepspeed_memory.py /tmp/ds/bench /tmp/ds_imported
"""

import sys
import time

import torch  # noqa: F401  imported before measuring, so the growth is the import's own

from hf_zero.checkpoint.deepspeed_import import import_deepspeed


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024


def main() -> None:
    base = peak_rss_mib()
    start = time.perf_counter()
    import_deepspeed(sys.argv[1], sys.argv[2])
    peak = peak_rss_mib()
    print(f"peak RSS after imports {base:.0f} MiB, peak {peak:.0f} MiB, growth {peak - base:.0f} MiB, "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
