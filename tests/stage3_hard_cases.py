"""Rank functions for stage 3's hard cases, each against DDP + torch.optim.AdamW.

LoRA (peft) with a sharded frozen base and activation checkpointing (reentrant and not),
a block called twice per forward, a weight shared by two blocks, and the prefetch /
max-live / persistence knobs, which must change only what is gathered when, never the math.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import hf_zero
from parity_cases import EPS, LR, MICRO, batch, tiny_gpt2

NUM_STEPS = 3


def lora_gpt2(n_layer: int = 2):
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2(n_layer=n_layer)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        lora_dropout=0.0, init_lora_weights=True)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():   # LoRA B starts at zero; make the adapters matter from step one
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return peft_model


def _enable_checkpointing(model, reentrant) -> None:
    if reentrant is None:
        return
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    base.enable_input_require_grads()   # reentrant checkpointing needs an input that requires grad


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _ddp_reference(build, rank: int, data) -> tuple[list[float], dict]:
    model = build()
    ddp = DDP(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=EPS)
    losses = []
    for step in range(NUM_STEPS):
        loss = data(ddp, rank, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _hf_zero_run(build, rank: int, data, zero: dict, prepare=None, stage: int = 3, steps: int = NUM_STEPS) -> dict:
    model = build()
    if prepare is not None:
        prepare(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=EPS)
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0,
                                        "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000, **zero}},
                                optimizer=opt)
    model.train()
    losses, gathered, frozen_empty = [], [], True
    for step in range(steps):
        engine.reset_comm_stats()
        loss = data(engine, rank, step)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        gathered.append(engine.comm_stats().get("all_gather", {}).get("bytes", 0))
        frozen_empty &= all(p.numel() == 0 for p in model.parameters() if not p.requires_grad)
    out = {"losses": losses, "all_gather_bytes": gathered, "frozen_empty_at_rest": frozen_empty,
           "mem": engine.memory_breakdown()}
    if stage == 3:
        out.update(peak_live_numel=engine.stage.peak_live_numel, num_prefetched=engine.stage.planner.num_prefetched,
                   num_misses=engine.stage.planner.num_misses,
                   unit_numels=sorted(u.numel for u in engine.stage.units), root_numel=engine.stage.root.numel)
    engine.destroy()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _lm_loss(model, rank: int, step: int) -> torch.Tensor:
    x = batch(rank, step, 0)
    return model(input_ids=x, labels=x).loss


def _max_diff(a: dict, b: dict) -> float:
    return max((a[n].float() - b[n].float()).abs().max().item() for n in b)


def lora_cases(rank: int, world: int) -> dict:
    """LoRA under stage 3, with and without activation checkpointing, against DDP."""
    ref_losses, ref_params = _ddp_reference(lora_gpt2, rank, _lm_loss)
    model_bytes = sum(p.numel() * p.element_size() for p in lora_gpt2().parameters())
    out = {"ref": ref_losses, "model_bytes": model_bytes}
    for reentrant in (None, False, True):
        run = _hf_zero_run(lora_gpt2, rank, _lm_loss, {"stage3_param_persistence_threshold": 0},
                           prepare=lambda m, r=reentrant: _enable_checkpointing(m, r))
        run["param_diff"] = _max_diff(run.pop("params"), ref_params)
        out[reentrant] = run
    run = _hf_zero_run(lora_gpt2, rank, _lm_loss, {"stage3_param_persistence_threshold": 0,
                                                    "stage3_persist_frozen_params": True})
    run["param_diff"] = _max_diff(run.pop("params"), ref_params)
    run["trainable_bytes"] = sum(p.numel() * p.element_size() for p in lora_gpt2().parameters() if p.requires_grad)
    out["persist_frozen"] = run
    return out


def checkpointing_all_stages(rank: int, world: int) -> dict:
    """GPT-2 with activation checkpointing (reentrant or not) at stages 0-2 vs DDP without it."""
    build = lambda: tiny_gpt2(n_layer=2)  # noqa: E731
    ref_losses, ref_params = _ddp_reference(build, rank, _lm_loss)
    out = {"ref": ref_losses}

    def enable(model, reentrant):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()

    for stage in (0, 1, 2):
        for reentrant in (False, True):
            run = _hf_zero_run(build, rank, _lm_loss, {}, prepare=lambda m, r=reentrant: enable(m, r), stage=stage)
            run["param_diff"] = _max_diff(run.pop("params"), ref_params)
            out[(stage, reentrant)] = run
    return out


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.mul_(1.0)   # edits its input in place (some models do): stage 3 must allow it
        return h + torch.tanh(self.lin(self.norm(h)))


class HardModel(nn.Module):
    """Block 0 runs twice per forward; blocks 1 and 2 share a linear layer; one frozen layer;
    block 0's norm also runs outside block 0 through an unregistered reference."""

    _no_split_modules = ["Block"]

    def __init__(self, width: int = 24):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(3)])
        self.blocks[2].lin = self.blocks[1].lin          # shared weights across two units
        self.blocks[1].norm.requires_grad_(False)        # a frozen parameter inside a unit
        self.out = nn.Linear(width, 4)
        self.borrowed = [self.blocks[0].norm]            # a plain list: not registered here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.blocks[0](self.blocks[0](h))             # called twice
        h = self.out_of_unit(self.blocks[2](self.blocks[1](h)))
        return self.out(h)

    def out_of_unit(self, h: torch.Tensor) -> torch.Tensor:
        # block 0's norm used outside block 0, through an unregistered reference
        return self.borrowed[0](h)


class SwitchingModel(nn.Module):
    """The forward path changes between steps (same on every rank): block 1 runs only on even
    steps, so the recorded prefetch order goes stale and block 1 gets no gradient half the time."""

    _no_split_modules = ["Block"]

    def __init__(self, width: int = 24):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(3)])
        self.out = nn.Linear(width, 4)
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for i, block in enumerate(self.blocks):
            if i != 1 or self.step % 2 == 0:
                h = block(h)
        return self.out(h)


def _switching_loss(model, rank: int, step: int) -> torch.Tensor:
    model.module.step = step   # DDP and the engine both hold the model as .module
    return _hard_loss(model, rank, step)


def _switching_build() -> SwitchingModel:
    torch.manual_seed(0)
    return SwitchingModel()


def switching_path(rank: int, world: int) -> dict:
    """A changing forward path with prefetch on, against DDP(find_unused_parameters)."""
    ref_model = _switching_build()
    ddp = DDP(ref_model, find_unused_parameters=True)
    opt = torch.optim.AdamW(ref_model.parameters(), lr=LR, eps=EPS)
    ref_losses = []
    for step in range(4):
        loss = _switching_loss(ddp, rank, step)
        loss.backward()
        # A parameter no rank used gets a zero gradient in ZeRO's flat buffers (and DeepSpeed's);
        # torch's AdamW would skip a None gradient instead, so give the reference the zeros.
        for p in ref_model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    run = _hf_zero_run(_switching_build, rank, _switching_loss, {"stage3_prefetch_bucket_size": 10**8,
                                                                 "stage3_param_persistence_threshold": 0}, steps=4)
    run["param_diff"] = _max_diff(run.pop("params"), {n: p.detach() for n, p in ref_model.named_parameters()})
    run["ref"] = ref_losses
    return run


def _hard_build() -> HardModel:
    torch.manual_seed(0)
    return HardModel()


def _hard_loss(model, rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
    return nn.functional.mse_loss(model(x), y)


KNOBS = {
    "no_prefetch": {"stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 0},
    "prefetch": {"stage3_prefetch_bucket_size": 10**8, "stage3_param_persistence_threshold": 0},
    "one_ahead": None,   # sized per model by one_ahead_knobs()
    "persistent": {"stage3_prefetch_bucket_size": 10**8, "stage3_param_persistence_threshold": 100},
}


def one_ahead_knobs(model: nn.Module) -> dict:
    """Prefetch one block ahead, live cap = root + two blocks (the one in use and the next)."""
    from hf_zero.stages.stage3_units import find_unit_modules

    blocks = [sum(p.numel() for p in m.parameters()) for m in find_unit_modules(model)]
    root = sum(p.numel() for p in model.parameters()) - sum(blocks)
    return {"stage3_prefetch_bucket_size": max(blocks), "stage3_max_live_parameters": root + 2 * max(blocks),
            "stage3_param_persistence_threshold": 0}


def hard_cases(rank: int, world: int) -> dict:
    """The hard model and GPT-2 under each knob setting, against DDP."""
    out = {}
    for name, build, loss in (("hard", _hard_build, _hard_loss), ("gpt2", lambda: tiny_gpt2(n_layer=3), _lm_loss)):
        ref_losses, ref_params = _ddp_reference(build, rank, loss)
        for knob, zero in KNOBS.items():
            zero = zero or one_ahead_knobs(build())
            run = _hf_zero_run(build, rank, loss, zero)
            run["knobs"] = zero
            run["param_diff"] = _max_diff(run.pop("params"), ref_params)
            run["ref"] = ref_losses
            out[(name, knob)] = run
    return out
