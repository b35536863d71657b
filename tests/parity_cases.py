"""Rank functions for the parity tests: hf_zero vs DDP + torch.optim.AdamW, same seed and data.

Everything here runs inside processes spawned by ``hf_zero.testing.run_on_ranks``; each
function runs a whole grid of cases in one process group and returns plain data.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import hf_zero

VOCAB, SEQ, MICRO = 128, 16, 2
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.01, 0.05
# [Note: why eps=1e-6] GPT-2's attention key bias has a mathematically zero gradient (softmax
# is shift-invariant), so its computed gradient is pure rounding noise. With eps=1e-8 Adam
# normalises that noise into O(lr) updates, and any change of reduction order (DDP divides
# before summing, a 3-rank ring sums in another order) moves that one parameter by ~1e-6
# whichever engine runs. eps=1e-6 keeps the atol-1e-6 comparison about the engine's
# arithmetic; every other hyperparameter is a common default.
EPS = 1e-6
NUM_STEPS = 4


def tiny_gpt2(seed: int = 0, n_embd: int = 32, n_layer: int = 2, dropout: float = 0.0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=dropout)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """Untied embeddings, RMSNorm, rotary buffers, gated MLP: the other common layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def batch(rank: int, step: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)


def train_steps(engine, rank: int, steps: range) -> list[float]:
    """One micro-batch per step through ``engine`` (DeepSpeed-style loop); the losses."""
    losses = []
    for step in steps:
        x = batch(rank, step, 0)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups as the HF Trainer builds them: no decay for biases and LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def run_ddp(rank: int, accum: int, clip: float, dtype: torch.dtype = torch.float32, build=tiny_gpt2):
    model = build().to(dtype)
    ddp = DDP(model)
    opt = torch.optim.AdamW(param_groups(model), lr=LR, eps=EPS)
    losses, norms = [], []
    for step in range(NUM_STEPS):
        for micro in range(accum):
            x = batch(rank, step, micro)
            ctx = ddp.no_sync() if micro < accum - 1 else contextlib.nullcontext()
            with ctx:
                loss = ddp(input_ids=x, labels=x).loss
                (loss / accum).backward()
            losses.append(loss.item())
        # max_norm=inf leaves gradients as they are but still returns the norm
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf")).item())
        opt.step()
        opt.zero_grad()
    return losses, full_params(model), norms


def zero_config(stage: int, accum: int, clip: float, world: int, bf16: bool = False) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": accum,
        "train_batch_size": MICRO * accum * world,
        "gradient_clipping": clip,
        "bf16": {"enabled": bf16},
        # Small buckets: many buckets per group, parameters straddling rank chunks.
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000, "allgather_bucket_size": 5000,
                              # stage 3: biases and norms persistent, matrices sharded
                              "stage3_param_persistence_threshold": 100},
    }


def run_hf_zero(rank: int, world: int, stage: int, accum: int, clip: float, bf16: bool = False,
                plain_torch_loop: bool = False, build=tiny_gpt2, zero_extra: dict | None = None):
    model = build()
    opt = torch.optim.AdamW(param_groups(model), lr=LR, eps=EPS)
    config = zero_config(stage, accum, clip, world, bf16)
    config["zero_optimization"].update(zero_extra or {})   # e.g. mics_shard_size (hybrid_cases.py)
    engine = hf_zero.initialize(model, config, optimizer=opt)
    assert engine.module is model
    if bf16:
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16
        assert all(m.dtype == torch.float32 for g in engine.masters.masters for m in g)
    losses, norms = [], []
    for step in range(NUM_STEPS):
        for micro in range(accum):
            x = batch(rank, step, micro)
            if plain_torch_loop:  # what accelerate / the HF Trainer do
                ctx = model.no_sync() if micro < accum - 1 else contextlib.nullcontext()
                with ctx:
                    loss = model(input_ids=x, labels=x).loss
                    (loss / accum).backward()
            else:
                loss = engine(input_ids=x, labels=x).loss
                engine.backward(loss)
            losses.append(loss.item())
            if not plain_torch_loop:
                engine.step()
        if plain_torch_loop:
            engine.optimizer.step()
            model.zero_grad()
        norms.append(engine.get_global_grad_norm())
    engine.destroy()
    return losses, full_params(model), norms


def parity_grid(rank: int, world: int) -> dict:
    """fp32: every stage x accumulation x clipping, against DDP; plus the plain torch loop."""
    out = {}
    for accum, clip in itertools.product((1, 2), (0.0, CLIP)):
        ref_losses, ref_params, ref_norms = run_ddp(rank, accum, clip)
        for stage in (0, 1, 2, 3):
            losses, params, norms = run_hf_zero(rank, world, stage, accum, clip)
            diff = max(((params[n] - ref_params[n]).abs().max().item(), n) for n in ref_params)
            out[(stage, accum, clip, "engine")] = (ref_losses, losses, diff)
            out[(stage, accum, clip, "norms")] = (ref_norms, norms)
        ref_losses_l, ref_params_l, ref_norms_l = run_ddp(rank, accum, clip, build=tiny_llama)
        losses, params, norms = run_hf_zero(rank, world, 3, accum, clip, build=tiny_llama)
        diff = max(((params[n] - ref_params_l[n]).abs().max().item(), n) for n in ref_params_l)
        out[(3, accum, clip, "llama")] = (ref_losses_l, losses, diff)
        out[(3, accum, clip, "llama-norms")] = (ref_norms_l, norms)
        if accum == 2:
            for stage in (1, 2, 3):
                losses, params, _ = run_hf_zero(rank, world, stage, accum, clip, plain_torch_loop=True)
                diff = max(((params[n] - ref_params[n]).abs().max().item(), n) for n in ref_params)
                out[(stage, accum, clip, "plain")] = (ref_losses, losses, diff)
    return out


def bf16_grid(rank: int, world: int) -> dict:
    """bf16 (fp32 masters) per stage, and pure-bf16 DDP as the yardstick, against fp32 DDP."""
    ref_losses = run_ddp(rank, 1, CLIP)[0]
    pure_losses = run_ddp(rank, 1, CLIP, dtype=torch.bfloat16)[0]
    out = {"fp32": ref_losses, "pure_bf16": pure_losses}
    for stage in (0, 1, 2, 3):
        out[stage] = run_hf_zero(rank, world, stage, 1, CLIP, bf16=True)[0]
    return out


class TwoBranch(torch.nn.Module):
    """A frozen layer, and two branches of which each rank uses one or the other per step."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.frozen = torch.nn.Linear(16, 16).requires_grad_(False)
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = self.frozen(torch.relu(self.inp(x)))
        return self.out(torch.relu(self.b(h) if use_b else self.a(h)))


def _branch_data(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g), (step + rank) % 2 == 1


def unused_and_frozen(rank: int, world: int) -> dict:
    """Parameters unused on some ranks/steps and frozen parameters, against DDP(find_unused)."""
    torch.manual_seed(0)
    ref_model = TwoBranch()
    ddp = DDP(ref_model, find_unused_parameters=True)
    ref_opt = torch.optim.AdamW([p for p in ref_model.parameters() if p.requires_grad], lr=LR, eps=EPS)
    ref_losses = []
    for step in range(NUM_STEPS):
        x, y, use_b = _branch_data(rank, step)
        loss = torch.nn.functional.mse_loss(ddp(x, use_b), y)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(loss.item())
    out = {}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = TwoBranch()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=EPS)
        engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
                                            "zero_optimization": {"stage": stage, "reduce_bucket_size": 100,
                                                                  "stage3_param_persistence_threshold": 0}},
                                    optimizer=opt)
        losses = []
        for step in range(NUM_STEPS):
            x, y, use_b = _branch_data(rank, step)
            loss = torch.nn.functional.mse_loss(engine(x, use_b), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        engine.destroy()   # stage 3: parameters become whole tensors again
        diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref_model.parameters()))
        frozen_same = torch.equal(model.frozen.weight, ref_model.frozen.weight)
        out[stage] = (ref_losses, losses, diff, frozen_same)
    return out
