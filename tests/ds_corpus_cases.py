"""Rank function: configs of the DeepSpeed corpus (tests/data/ds_configs/) through the HF
Trainer at world 2, inside the spawned gloo group of test_optimizers.py (one spawn for both).

fp32 (their "auto" precision resolves to off): the same Trainer run without hf_zero (DDP,
torch's AdamW) is the reference. Two of the configs carry DeepSpeed's ``WarmupLR`` with
"auto" values, which the Trainer fills with warmup_steps=0 -> 1 (hf_zero, as DeepSpeed 0.19,
warms up over at least 2 steps, log-shaped, and optimizer step k uses the schedule at k - 2:
lr 0 at the first two steps, the full lr from the third); their reference gets that schedule
as a torch LambdaLR."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

CORPUS = Path(__file__).parent / "data" / "ds_configs"
# Three with what users hit first: bfloat16 alias + stage 3 + both offloads; stage 2 + CPU
# offload with "auto" everywhere; LLaMA-Factory's stage 3 with extra top-level sections.
TRAINER_CONFIGS = ("transformers_zero3_bf16.json", "transformers_zero2.json", "llamafactory_ds_z3_offload.json")
WARMUP_LR_CONFIGS = ("transformers_zero3_bf16.json", "transformers_zero2.json")
MAX_STEPS = 3


class TokenWindows(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(config_name: str | None, warmup: bool = False) -> tuple[list[float], dict, list[str], object]:
    import hf_zero
    from transformers import Trainer
    from parity_cases import tiny_gpt2, full_params

    model = tiny_gpt2()
    with tempfile.TemporaryDirectory() as out:
        kwargs = dict(output_dir=out, use_cpu=True, report_to="none", per_device_train_batch_size=2,
                      max_steps=MAX_STEPS, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                      learning_rate=1e-3, adam_epsilon=1e-6, warmup_steps=0, lr_scheduler_type="constant")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if config_name is None:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0)
                schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.0 if warmup and s < 2 else 1.0)
                trainer = Trainer(model=model, args=hf_zero.ZeroTrainingArguments(**kwargs),
                                  train_dataset=TokenWindows(), optimizers=(optimizer, schedule))
            else:
                args = hf_zero.ZeroTrainingArguments(hf_zero=str(CORPUS / config_name), **kwargs)
                trainer = hf_zero.HfZeroTrainer(model=model, args=args, train_dataset=TokenWindows())
            trainer.train()
        engine = getattr(trainer, "hf_zero_engine", None)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        warned = sorted({str(w.message).split("'")[1] for w in caught if "does not honour" in str(w.message)})
        stage = engine.config.stage if engine is not None else None
        if engine is not None:
            engine.destroy()
        return losses, full_params(model), warned, stage


def trainer_corpus_runs(rank: int, world: int) -> dict:
    out = {}
    references = {False: _train(None), True: _train(None, warmup=True)}
    for name in TRAINER_CONFIGS:
        ref_losses, ref_params, _, _ = references[name in WARMUP_LR_CONFIGS]
        losses, params, warned, stage = _train(name)
        diff = max(((params[n] - ref_params[n]).abs().max().item(), n) for n in ref_params)
        out[("trainer", name)] = (ref_losses, losses, diff, warned, stage)
    return out
