"""A data-parallel torch loop that builds no model hf_zero can shard (hf_zero's launch patches
only the Trainer and Accelerator.prepare): under ``hf-zero launch`` the unsharded-run guard must
stop it at its first optimizer step. Rank 0 writes ``<out>/done`` when the loop finishes.

Gradients are averaged with plain ``all_reduce`` calls rather than torch's DDP wrapper: the
wrapper's gloo worker threads hang now and then in ``destroy_process_group`` at exit here
(torch's destructor joins a thread that waits for the GIL), which has nothing to do with what
this script checks."""

import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        optimizer.step()
        optimizer.zero_grad()
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "done"), "w").close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
