"""Rank functions for partitioned construction (hf_zero.zero_init / hf_zero.from_pretrained)."""

from __future__ import annotations

import math

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import hf_zero
from parity_cases import EPS, LR, MICRO, batch, tiny_gpt2

STAGE3 = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": 3, "reduce_bucket_size": 3000, "stage3_param_persistence_threshold": 0}}


def _gathered(model) -> dict[str, torch.Tensor]:
    with hf_zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _config():
    return tiny_gpt2().config


def construction(rank: int, world: int, saved_dir: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    # Random init, shard by shard (stage 3) vs the same init materialised whole (stage 0).
    with hf_zero.zero_init(seed=7):
        sharded = AutoModelForCausalLM.from_config(_config())
    out["meta_before"] = all(p.is_meta for p in sharded.parameters())
    engine = hf_zero.initialize(sharded, STAGE3)
    out["at_rest_empty"] = all(p.numel() == 0 for p in sharded.parameters())
    out["sharded"] = _gathered(sharded)
    engine.destroy()
    with hf_zero.zero_init(seed=7):
        whole = AutoModelForCausalLM.from_config(_config())
    engine = hf_zero.initialize(whole, {**STAGE3, "zero_optimization": {"stage": 0}})
    out["whole"] = {n: p.detach().clone() for n, p in whole.named_parameters()}
    engine.destroy()

    # Pretrained weights, each rank reading its slices, with LoRA applied on top.
    model = get_peft_model(hf_zero.from_pretrained(saved_dir),
                           __import__("peft").LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    engine = hf_zero.initialize(model, STAGE3)
    out["pretrained"] = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
                         for n, p in _gathered(model).items()}
    engine.destroy()
    del LoraConfig

    # Training from pretrained weights loaded slice by slice matches DDP on the original model.
    ref = tiny_gpt2()
    ddp = DDP(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=EPS)
    ref_losses = []
    for step in range(3):
        x = batch(rank, step, 0)
        loss = ddp(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    model = hf_zero.from_pretrained(saved_dir)
    engine = hf_zero.initialize(model, STAGE3, optimizer=torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS))
    losses = []
    for step in range(3):
        x = batch(rank, step, 0)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    out["train"] = (ref_losses, losses)
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_growth(build) -> tuple[int, object]:
    """Peak RSS growth (bytes) while ``build()`` runs: the kernel's high-water mark is reset first."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    result = build()
    return (_status_kib("VmHWM") - before) * 1024, result


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=32, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=4096, tie_word_embeddings=False)


def peak_rss(rank: int, world: int, saved_dir: str, kind: str) -> dict:
    """Peak RSS growth per rank building (zero_init) or loading (from_pretrained) a 113M model.
    One kind per process: memory freed by one build stays in the allocator and would hide
    the next build's growth."""
    from transformers import AutoModelForCausalLM

    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"params": {"lr": 1e-4}},
              "zero_optimization": {"stage": 3}}

    def build_random():
        with hf_zero.zero_init(seed=1):
            model = AutoModelForCausalLM.from_config(llama_config())
        return model, hf_zero.initialize(model, config)

    def load_pretrained():
        model = hf_zero.from_pretrained(saved_dir)
        return model, hf_zero.initialize(model, config)

    # Warm-up on a tiny model of the same class: importing the modeling code costs ~170 MB
    # of RSS once per process, whatever the model size; it is not what is measured here.
    tiny = llama_config()
    tiny.num_hidden_layers, tiny.hidden_size, tiny.intermediate_size, tiny.vocab_size = 1, 64, 128, 64
    with hf_zero.zero_init():
        warm = AutoModelForCausalLM.from_config(tiny)
    hf_zero.initialize(warm, config).destroy()
    build = build_random if kind == "random" else load_pretrained
    growth, (model, engine) = _peak_growth(build)
    return {"growth": growth, "psi": sum(p.ds_numel for p in model.parameters()),
            "finite_logits": math.isfinite(engine(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits
                                           .float().sum().item())}
