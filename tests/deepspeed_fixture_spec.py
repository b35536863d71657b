"""What the DeepSpeed checkpoint fixtures were made from: model, data, optimizer, schedule.

Shared by ``tests/fixtures/make_deepspeed_checkpoints.py`` (run by hand under DeepSpeed) and
``tests/test_deepspeed_import.py`` (CI, without DeepSpeed), so the import tests continue
exactly the run DeepSpeed recorded. Imports neither DeepSpeed nor hf_zero.
"""

from __future__ import annotations

import torch

GLOBAL_BATCH = 12          # divisible by every world size the tests use (1, 2, 3)
SEQ = 16
SAVE_AFTER_STEPS = 3       # the checkpoint is taken after this many optimizer steps
RECORDED_STEPS = 4         # DeepSpeed's losses recorded for the steps after the checkpoint
LR = 1e-2
# Odd sizes so that DeepSpeed pads partitions (stage 3: odd parameter numels).
MODEL = dict(vocab_size=67, n_positions=SEQ, n_embd=15, n_layer=2, n_head=3, resid_pdrop=0.0,
             embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
# name -> (world size, stage, dtype, extra config keys merged into zero_optimization / the top level)
FIXTURES = {
    "stage1_fp32": (2, 1, "fp32", {}, {}),
    "stage2_fp32": (2, 2, "fp32", {}, {}),
    # several sub-groups; small parameters persist (not partitioned for compute, still for the optimizer)
    "stage3_fp32": (2, 3, "fp32", {"sub_group_size": 2000, "stage3_param_persistence_threshold": 100}, {}),
    "stage2_fp32_w3": (3, 2, "fp32", {}, {}),
    "stage2_bf16": (2, 2, "bf16", {}, {}),
    "stage3_bf16": (2, 3, "bf16", {"sub_group_size": 2000}, {}),
    # bf16 with fp32 gradient accumulation at stage 1 runs DeepSpeed's BF16_Optimizer
    "stage1_bf16_fp32accum": (2, 1, "bf16", {}, {"data_types": {"grad_accum_dtype": "fp32"}}),
    # dynamic loss scaling; a small window so the scale changes before the checkpoint
    "stage2_fp16": (2, 2, "fp16", {}, {"fp16": {"enabled": True, "initial_scale_power": 8,
                                                 "loss_scale_window": 2, "hysteresis": 2}}),
    # elastic_checkpoint: per-group states without padding and without hyperparameters
    "stage1_fp32_elastic": (2, 1, "fp32", {"elastic_checkpoint": True}, {}),
    # frozen parameters (FROZEN below): stored whole (stage 2) or partitioned (stage 3)
    "stage2_fp32_frozen": (2, 2, "fp32", {}, {}),
    "stage3_fp32_frozen": (2, 3, "fp32", {"stage3_param_persistence_threshold": 0}, {}),
}
FROZEN = ("transformer.wpe.weight", "transformer.ln_f.bias")   # frozen in the *_frozen fixtures


def build_model(name: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**MODEL))
    if name.endswith("_frozen"):
        for param_name, p in model.named_parameters():
            p.requires_grad_(param_name not in FROZEN)
    return model


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups as the HF Trainer makes them: biases and LayerNorms without weight decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def global_batch(step: int) -> torch.Tensor:
    """Token ids of optimizer step ``step`` (0-based), the same at every world size: arithmetic
    sequences modulo the vocabulary, learnable, so the loss falls and depends on the state."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, MODEL["vocab_size"], (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % MODEL["vocab_size"]


def rank_batch(step: int, rank: int, world_size: int) -> torch.Tensor:
    micro = GLOBAL_BATCH // world_size
    return global_batch(step)[rank * micro:(rank + 1) * micro]


def config(name: str) -> dict:
    """The DeepSpeed config of a fixture (hf_zero reads the same keys)."""
    world_size, stage, dtype, zero_extra, top_extra = FIXTURES[name]
    return {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                     "warmup_num_steps": 10}},
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": {"stage": stage, **zero_extra},
        **top_extra,
    }
