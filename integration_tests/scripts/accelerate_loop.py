"""A plain accelerate training loop; hf_zero needs the two lines marked ``# hf_zero``.

Gradient accumulation through ``accelerator.accumulate``, ``accelerator.backward``,
``accelerator.clip_grad_norm_``, ``save_state`` / ``load_state`` (``--save_at`` / ``--resume``)
and ``get_state_dict``. ``--plain`` skips hf_zero: run in one process, it is the reference.
Rank 0 writes the per-optimizer-step losses and gradient norms to ``<out>/results.json``
and the final model (from ``get_state_dict``) to ``<out>/model``.
"""

import argparse
import json
import os
import sys

import torch
from accelerate import Accelerator

import hf_zero  # hf_zero

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stock_trainer import TokenWindows, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save_at", type=int, default=0)
    parser.add_argument("--resume", default="")
    parser.add_argument("--plain", action="store_true")
    args = parser.parse_args()

    # The schedule counts optimizer steps whatever the world size (accelerate's default steps
    # it once per process), so a resume on another world size continues the same curve.
    accelerator = Accelerator(gradient_accumulation_steps=args.accum, step_scheduler_with_optimizer=False)
    model = build_model(lora=False)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, eps=1e-6)
    if not args.plain:
        model, optimizer = hf_zero.prepare_accelerate(accelerator, model, optimizer)  # hf_zero
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (2 * args.steps))
    loader = torch.utils.data.DataLoader(TokenWindows(64, 16, seed=1), batch_size=args.micro, shuffle=False)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    step, results = 0, {"loss": {}, "grad_norm": {}}
    if args.resume:
        accelerator.load_state(args.resume)
        step = int(open(os.path.join(args.resume, "step.txt")).read())
        loader = accelerator.skip_first_batches(loader, step * args.accum)
    micro_losses = []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        micro_losses.append(accelerator.gather(loss.detach()[None]).mean().item())
        if accelerator.sync_gradients:
            step += 1
            results["loss"][step] = sum(micro_losses) / len(micro_losses)
            results["grad_norm"][step] = float(norm)
            micro_losses = []
            if step == args.save_at:
                accelerator.save_state(os.path.join(args.out, "state"))
                if accelerator.is_main_process:
                    with open(os.path.join(args.out, "state", "step.txt"), "w") as f:
                        f.write(str(step))
            if step == args.steps:
                break
    state_dict = accelerator.get_state_dict(model)   # every rank: stage 3 gathers
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(os.path.join(args.out, "model"), state_dict=state_dict)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f)
    # transformers' run_clm_no_trainer.py ending, on every rank (stage 3: hf_zero gathers per file)
    accelerator.unwrap_model(model).save_pretrained(os.path.join(args.out, "model_unwrapped"),
                                                    is_main_process=accelerator.is_main_process,
                                                    save_function=accelerator.save)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
