"""Helper for benchmarks/checkpoint.py: a DeepSpeed ZeRO-2 checkpoint of the same model.

Run under torchrun with a Python that has DeepSpeed (kept out of hf_zero's dependencies):
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/_deepspeed_checkpoint.py SIZE DIR
"""

import sys

import deepspeed
import torch
from transformers import GPT2Config, GPT2LMHeadModel

SIZES = {"25M": dict(n_embd=256, n_layer=12, n_head=4), "100M": dict(n_embd=768, n_layer=8, n_head=12)}


def main() -> None:
    size, directory = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=128, **SIZES[size]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "reduce_bucket_size": 6553600, "allgather_bucket_size": 6553600}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x = torch.randint(0, model.config.vocab_size, (4, 128))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    engine.save_checkpoint(directory, tag="bench")


if __name__ == "__main__":
    main()
