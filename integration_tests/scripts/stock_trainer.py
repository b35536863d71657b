"""A stock Hugging Face Trainer script: plain ``Trainer`` and ``TrainingArguments``, no hf_zero.

``hf-zero launch`` runs it under hf_zero unmodified; run alone (or under torchrun) it is the
reference. Tiny GPT-2 from a config (random init), data built here (fixed-length token
windows, so every micro-batch has the same number of label tokens). Rank 0 writes the log
history and the eval / predict metrics to ``<output_dir>/results.json``.
"""

import json
import os
from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments


@dataclass
class ScriptArguments:
    lora: bool = False
    num_samples: int = 48
    seq: int = 16
    generate: bool = False
    pretrained: str = ""   # load this directory with AutoModelForCausalLM.from_pretrained instead of building


class TokenWindows(torch.utils.data.Dataset):
    def __init__(self, num: int, seq: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 256, (num, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(lora: bool) -> torch.nn.Module:
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                 fan_in_fan_out=True, lora_dropout=0.0, task_type="CAUSAL_LM"))
    return model


def run(script: ScriptArguments, args: TrainingArguments, trainer_cls: type = Trainer) -> dict:
    if script.pretrained:   # after the TrainingArguments exist: DeepSpeed's partitioned-load order
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(script.pretrained)
    else:
        model = build_model(script.lora)
    built_on_meta = all(p.is_meta for p in model.parameters())
    train = TokenWindows(script.num_samples, script.seq, seed=1)
    evaluation = TokenWindows(8, script.seq, seed=2)
    trainer = trainer_cls(model=model, args=args, train_dataset=train, eval_dataset=evaluation)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    results = {"log_history": trainer.state.log_history, "eval": trainer.evaluate(),
               "predict": trainer.predict(evaluation).metrics,
               "activation_checkpointing": bool(getattr(model, "is_activation_checkpointing", False)),
               "built_on_meta": built_on_meta}
    if script.generate:   # every rank generates (different lengths are fine with synced_gpus)
        prompt = evaluation.ids[:1, :4]
        out = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, synced_gpus=args.world_size > 1,
                             pad_token_id=0)
        results["generated"] = out.tolist()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f)
    return results


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    run(script, args)


if __name__ == "__main__":
    main()
