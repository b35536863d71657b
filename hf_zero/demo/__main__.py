"""``make demo``: LoRA fine-tune of a small GPT-2 under hf_zero on local gloo processes.

Run with ``torchrun --standalone --nproc_per_node 2 -m hf_zero.demo``. Everything is local:
the model is built from a config (random init), the text ships beside this file and is
loaded with ``datasets``, and a byte-level vocabulary needs no tokenizer download.
ZeRO stage 3 is the default: the LoRA weights are partitioned and gathered per transformer
block; the frozen base stays whole on every rank (never re-gathered).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero
from hf_zero.checkpoint.layout import true_numel

CORPUS = Path(__file__).with_name("corpus.txt")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=3, choices=(0, 1, 2, 3))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--out", default="out/demo")
    return parser.parse_args()


def byte_batches(seq: int, micro: int, rank: int, world: int):
    """Endless micro-batches of byte ids from the shipped corpus, each rank its own slice."""
    from datasets import load_dataset

    text = "\n".join(load_dataset("text", data_files=str(CORPUS), split="train")["text"])
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    windows = ids[: (len(ids) // seq) * seq].view(-1, seq)
    g = torch.Generator().manual_seed(0)
    while True:
        order = torch.randperm(len(windows), generator=g)
        for start in range(rank * micro, len(order) - micro * world + 1, micro * world):
            yield windows[order[start:start + micro]]


def build_model(rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=128, n_embd=256, n_layer=4, n_head=4,
                        bos_token_id=10, eos_token_id=10)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def memory_table(engine: hf_zero.ZeroEngine, world: int) -> str:
    mem = engine.memory_breakdown()
    trainable = sum(true_numel(p) for g in engine.flat_groups for p in g.params)
    frozen = sum(true_numel(p) for p in engine.module.parameters()) - trainable
    # Plain data parallelism holds full fp32 params, grads and two Adam moments on every rank.
    ddp = {"persistent_params": 0, "params": 4 * (trainable + frozen), "grads": 4 * trainable, "master_params": 0,
           "optimizer_states": 8 * trainable, "comm_buffers": 0}
    ddp["total"] = sum(ddp.values())
    lines = [f"{'bytes per rank':<18}{'hf_zero':>12}{'plain DP':>12}"]
    lines += [f"{k:<18}{mem[k]:>12,}{ddp[k]:>12,}" for k in ddp]
    lines.append(f"(world {world}; {trainable:,} trainable LoRA and {frozen:,} frozen parameters)")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = build_model(rank)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_type": "linear"}},
              "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 2_000_000}}
    engine = hf_zero.initialize(model, config)
    batches = byte_batches(args.seq, args.micro_batch, rank, world)
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, desc=f"LoRA under ZeRO-{args.stage}")
    start, first_loss = time.perf_counter(), None
    for _ in range(args.steps):
        x = next(batches)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        first_loss = first_loss if first_loss is not None else loss.item()
        if progress is not None:
            progress.set_postfix(loss=f"{loss.item():.3f}")
            progress.update()
    if progress is not None:
        progress.close()
        elapsed = time.perf_counter() - start
        print(f"loss {first_loss:.3f} -> {loss.item():.3f} in {args.steps} steps ({elapsed:.1f} s)")
        print(memory_table(engine, world))
    engine.destroy()   # stage 3 leaves the model with whole parameters again
    if rank == 0:
        out = Path(args.out)
        model.save_pretrained(out / "adapter")
        model.merge_and_unload().save_pretrained(out / "model")
        print(f"saved the LoRA adapter to {out / 'adapter'} and the merged model to {out / 'model'}")
    engine.comm.barrier()   # rank 0 finished writing before any rank leaves
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
