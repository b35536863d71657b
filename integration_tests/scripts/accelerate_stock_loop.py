"""A plain accelerate training loop with no hf_zero in it (``hf-zero launch`` runs it under
ZeRO unmodified; under torchrun with ``ACCELERATE_USE_CPU=true`` it is the DDP reference).

Gradient accumulation through ``accelerator.accumulate``, ``accelerator.backward``,
``accelerator.clip_grad_norm_`` (unless ``--clip 0``), ``save_state`` / ``load_state``
(``--save_at`` / ``--resume``) and ``get_state_dict``. ``--clip 1.0,0`` trains once per
value in one process (into ``<out>/clip<value>``), to share the start-up. Rank 0 writes the
per-optimizer-step losses and gradient norms to ``<out>/results.json`` and the final model
(from ``get_state_dict``) to ``<out>/model``. accelerate_loop.py is the same loop with the
explicit ``hf_zero.prepare_accelerate`` line.
"""

import argparse
import json
import os
import sys
from typing import Callable, Optional

import torch
from accelerate import Accelerator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stock_trainer import TokenWindows, build_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--clip", default="1.0", help="max_norm for clip_grad_norm_ (0: never called); a list trains "
                        "once per value")
    parser.add_argument("--out", required=True)
    parser.add_argument("--save_at", type=int, default=0)
    parser.add_argument("--resume", default="")
    parser.add_argument("--plain", action="store_true")
    return parser.parse_args()


def train(args: argparse.Namespace, clip: float, out: str, before_prepare: Optional[Callable] = None) -> None:
    # The schedule counts optimizer steps whatever the world size (accelerate's default steps
    # it once per process), so a resume on another world size continues the same curve.
    accelerator = Accelerator(gradient_accumulation_steps=args.accum, step_scheduler_with_optimizer=False)
    model = build_model(lora=False)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, eps=1e-6)
    if before_prepare is not None:
        model, optimizer = before_prepare(accelerator, model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (2 * args.steps))
    loader = torch.utils.data.DataLoader(TokenWindows(64, 16, seed=1), batch_size=args.micro, shuffle=False)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    step, results = 0, {"loss": {}, "grad_norm": {}, "accum": accelerator.gradient_accumulation_steps}
    if args.resume:
        accelerator.load_state(args.resume)
        step = int(open(os.path.join(args.resume, "step.txt")).read())
        loader = accelerator.skip_first_batches(loader, step * accelerator.gradient_accumulation_steps)
    micro_losses = []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            norm = None
            if accelerator.sync_gradients and clip > 0:
                norm = accelerator.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        micro_losses.append(accelerator.gather(loss.detach()[None]).mean().item())
        if accelerator.sync_gradients:
            step += 1
            results["loss"][step] = sum(micro_losses) / len(micro_losses)
            results["grad_norm"][step] = None if norm is None else float(norm)
            micro_losses = []
            if step == args.save_at:
                accelerator.save_state(os.path.join(out, "state"))
                if accelerator.is_main_process:
                    with open(os.path.join(out, "state", "step.txt"), "w") as f:
                        f.write(str(step))
            if step == args.steps:
                break
    state_dict = accelerator.get_state_dict(model)   # every rank: stage 3 gathers
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(os.path.join(out, "model"), state_dict=state_dict)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f)
    # transformers' run_clm_no_trainer.py ending, on every rank (stage 3: hf_zero gathers per file)
    accelerator.unwrap_model(model).save_pretrained(os.path.join(out, "model_unwrapped"),
                                                    is_main_process=accelerator.is_main_process,
                                                    save_function=accelerator.save)
    accelerator.wait_for_everyone()


def main(before_prepare: Optional[Callable] = None) -> None:
    args = parse_args()
    clips = [float(c) for c in args.clip.split(",")]
    for clip in clips:
        out = args.out if len(clips) == 1 else os.path.join(args.out, f"clip{clip:g}")
        train(args, clip, out, None if args.plain else before_prepare)


if __name__ == "__main__":
    main()
