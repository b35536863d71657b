"""Rank functions: transformers' ``from_pretrained`` building partitioned under hf_zero (zero_init,
the Trainer with a stage-3 config, accelerate with zero3_init_flag), on 2 gloo ranks.

References: ``AutoModelForCausalLM.from_pretrained`` of the same directory (logits), the same
Trainer run without hf_zero (DDP), a DDP loop over the whole loaded model, and the fp32 model
size (memory bound)."""

from __future__ import annotations

import gc
import json
import os
import tempfile

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import hf_zero
from parity_cases import EPS, LR, VOCAB, batch
from zero_init_cases import _peak_growth, llama_config

STAGE3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 3000, "stage3_param_persistence_threshold": 0}}
STEPS = 3


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def peak_loading_rss(saved_dir: str) -> dict:
    """Peak RSS growth of ``with zero_init(): AutoModelForCausalLM.from_pretrained`` + initialize
    (stage 3) on a 113M Llama. First thing in its process: freed memory stays in the allocator
    and would hide a later build's growth."""
    from transformers import AutoModelForCausalLM

    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"params": {"lr": 1e-4}},
              "zero_optimization": {"stage": 3}}
    tiny = llama_config()   # warm-up: the modeling code's own ~170 MB, not what is measured
    tiny.num_hidden_layers, tiny.hidden_size, tiny.intermediate_size, tiny.vocab_size = 1, 64, 128, 64
    with hf_zero.zero_init():
        warm = AutoModelForCausalLM.from_config(tiny)
    hf_zero.initialize(warm, config).destroy()

    def load():
        with hf_zero.zero_init():
            model = AutoModelForCausalLM.from_pretrained(saved_dir)
        return model, hf_zero.initialize(model, config)

    growth, (model, engine) = _peak_growth(load)
    out = {"growth": growth, "psi": sum(p.ds_numel for p in model.parameters())}
    engine.destroy()
    return out


def zero_init_logits(dirs: dict[str, str]) -> dict:
    from transformers import AutoModelForCausalLM

    x = torch.arange(12).reshape(2, 6) % VOCAB
    out = {}
    for name in ("gpt2", "llama_sharded"):
        reference = _logits(AutoModelForCausalLM.from_pretrained(dirs[name]), x)
        with hf_zero.zero_init():
            model = AutoModelForCausalLM.from_pretrained(dirs[name])
        meta = all(p.is_meta for p in model.parameters())
        engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1, **STAGE3})
        out[name] = (meta, (_logits(model, x) - reference).abs().max().item())
        engine.destroy()
    # a trained peft adapter loaded onto the meta-built model: its values, not a fresh init
    from peft import PeftModel

    reference = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["gpt2"]),
                                                  dirs["adapter"]), x)
    with hf_zero.zero_init():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["gpt2"]), dirs["adapter"],
                                          is_trainable=True)
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1, **STAGE3})
    out["adapter"] = (True, (_logits(model, x) - reference).abs().max().item())
    engine.destroy()
    return out


class TokenWindows(torch.utils.data.Dataset):
    def __init__(self, rows: int = 16):
        self.ids = torch.randint(0, VOCAB, (rows, 8), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_kwargs(out: str) -> dict:
    return dict(output_dir=out, use_cpu=True, report_to="none", per_device_train_batch_size=2, max_steps=STEPS,
                logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, learning_rate=LR, adam_epsilon=EPS,
                warmup_steps=0, lr_scheduler_type="constant", dataloader_drop_last=True)


def _train(trainer) -> list[float]:
    trainer.train()
    engine = getattr(trainer, "hf_zero_engine", None)
    if engine is not None:
        engine.destroy()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def trainer_routes(saved_dir: str) -> dict:
    """The same Trainer run: plain (DDP, the reference), the --deepspeed flag of
    ZeroTrainingArguments, and a model loaded before the arguments exist (built whole)."""
    from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(**_trainer_kwargs(tmp))
        model = AutoModelForCausalLM.from_pretrained(saved_dir)
        out["ddp"] = _train(Trainer(model=model, args=args, train_dataset=TokenWindows()))
        del args, model
        before = AutoModelForCausalLM.from_pretrained(saved_dir)   # no stage-3 arguments yet: whole
        out["before_args_whole"] = not any(p.is_meta for p in before.parameters())
        argv = [f"--{k}={v}" for k, v in _trainer_kwargs(tmp).items()]   # the command line of a script
        args, = HfArgumentParser(hf_zero.ZeroTrainingArguments).parse_args_into_dataclasses(
            [*argv, "--deepspeed", json.dumps(STAGE3)])
        model = AutoModelForCausalLM.from_pretrained(saved_dir)
        out["flag_meta"] = all(p.is_meta for p in model.parameters()) and hasattr(model, "_hf_zero_weights")
        out["flag"] = _train(hf_zero.HfZeroTrainer(model=model, args=args, train_dataset=TokenWindows()))
        del args, model
        gc.collect()   # the arguments are gone: from_pretrained builds whole again
        out["after_args_whole"] = not any(p.is_meta for p in AutoModelForCausalLM.from_pretrained(saved_dir)
                                          .parameters())
    return out


def bootstrap_routes(saved_dir: str) -> dict:
    """Unmodified code under the bootstrap's patches with HF_ZERO_CONFIG at stage 3: a plain
    ``TrainingArguments`` + ``transformers.Trainer`` script, and an accelerate loop with
    ``zero3_init_flag`` (``ACCELERATE_DEEPSPEED_ZERO3_INIT``) against DDP over the whole model."""
    import transformers
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from hf_zero.integrations import bootstrap
    from hf_zero.integrations.accelerate import install_prepare_patch
    from hf_zero.integrations.trainer import install_partitioned_loading

    out = {}
    os.environ["HF_ZERO_CONFIG"] = json.dumps(STAGE3)
    bootstrap.install()
    install_partitioned_loading()
    install_prepare_patch()
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(**_trainer_kwargs(tmp))
        model = AutoModelForCausalLM.from_pretrained(saved_dir)
        out["stock_meta"] = all(p.is_meta for p in model.parameters())
        out["stock"] = _train(transformers.Trainer(model=model, args=args, train_dataset=TokenWindows()))
        del args, model
        gc.collect()
    out["accelerate"] = _accelerate_loop(saved_dir, AutoModelForCausalLM, Accelerator)
    return out


def _accelerate_loop(saved_dir: str, auto_class, accelerator_class) -> dict:
    rank = torch.distributed.get_rank()
    reference = auto_class.from_pretrained(saved_dir)   # before any Accelerator: whole
    ddp = DDP(reference)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, eps=EPS)
    expected = []
    for step in range(STEPS):
        x = batch(rank, step, 0)
        loss = ddp(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
    os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = "true"
    accelerator = accelerator_class(cpu=True)
    model = auto_class.from_pretrained(saved_dir)
    meta = all(p.is_meta for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    losses = []
    for step in range(STEPS):
        x = batch(rank, step, 0)
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    accelerator.hf_zero_engine.destroy()
    return {"meta": meta, "expected": expected, "losses": losses}


def all_routes(rank: int, world: int, dirs: dict[str, str]) -> dict:
    out = {"rss": peak_loading_rss(dirs["llama113m"])}   # first: see peak_loading_rss
    out["zero_init"] = zero_init_logits(dirs)
    out["trainer"] = trainer_routes(dirs["gpt2"])
    out["bootstrap"] = bootstrap_routes(dirs["gpt2"])
    return out
