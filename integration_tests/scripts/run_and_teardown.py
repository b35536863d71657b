"""``torchrun ... run_and_teardown.py script.py ARGS``: run an unmodified script (runpy, as
``python script.py``) and then destroy its process group, as hf_zero's bootstrap does.

Plain DDP references at world 4 here sometimes abort at interpreter shutdown (SIGABRT,
"terminate called without an active exception": gloo's threads torn down while joinable)
after the script finished and wrote its results; tearing the group down first avoids that
without touching the training.
"""

import os
import runpy
import sys

import torch.distributed as dist

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    if dist.is_initialized():
        dist.destroy_process_group()
