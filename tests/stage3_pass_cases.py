"""Rank functions: stage 3's pass state under irregular training loops, against a torch reference.

The reference is the same model unsharded, gradients averaged with ``all_reduce`` and
``torch.optim.AdamW`` (DDP cannot run two forwards before one backward). Each scenario is
an irregular loop (stage3_pass.py's [Note: stage-3 pass state]) run for a few steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import hf_zero
from parity_cases import EPS, LR, MICRO, batch
from stage3_memory_cases import llama

NUM_STEPS = 3


class BlockFailure(Exception):
    pass


def _lora_llama():
    from peft import LoraConfig, get_peft_model

    model = llama(num_layers=3, hidden=32)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    with torch.no_grad():   # LoRA B starts at zero; make the adapters matter from step one
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return peft_model


def _lm(model, x):
    return model(input_ids=x, labels=x)


def forward_without_backward(model, rank, step, backward):
    _lm(model, batch(rank, step, 1))             # a forward with grad whose loss is dropped
    return _lm(model, batch(rank, step, 0)).loss


def forward_between_backward_and_step(model, rank, step, backward):
    loss = _lm(model, batch(rank, step, 0)).loss
    backward(loss)                               # the runner's backward is skipped for this one
    _lm(model, batch(rank, step, 1))             # still gathered when the optimizer steps
    return None


def no_grad_pass_before_backward(model, rank, step, backward):
    x = batch(rank, step, 0)
    out = _lm(model, x)
    with torch.no_grad():                        # a teacher pass on other data
        teacher = model(input_ids=batch(rank, step, 1)).logits
    return out.loss + 0.1 * (out.logits - teacher).pow(2).mean()


def disable_adapter_reference(model, rank, step, backward):
    x = batch(rank, step, 0)
    out = _lm(model, x)
    with torch.no_grad(), model.disable_adapter():   # what DPO trainers do for the reference
        reference = model(input_ids=x).logits
    return out.loss + 0.1 * (out.logits - reference).pow(2).mean()


def exception_in_a_block(model, rank, step, backward):
    layer = model.model.layers[1]
    handle = layer.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(BlockFailure()))
    try:
        _lm(model, batch(rank, step, 1))
    except BlockFailure:
        pass
    finally:
        handle.remove()
    return _lm(model, batch(rank, step, 0)).loss


def two_forwards_one_backward(model, rank, step, backward):
    return _lm(model, batch(rank, step, 0)).loss + _lm(model, batch(rank, step, 1)).loss


SCENARIOS = {f.__name__: f for f in (forward_without_backward, forward_between_backward_and_step,
                                     no_grad_pass_before_backward, disable_adapter_reference,
                                     exception_in_a_block, two_forwards_one_backward)}


class _Reference:
    """The unsharded model: ``backward`` averages gradients over ranks, AdamW steps."""

    def __init__(self, model, world):
        self.model, self.world = model, world
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=EPS)

    def step(self):
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world
        self.opt.step()
        self.opt.zero_grad()


def _run(name, rank, world, sharded, zero):
    build = _lora_llama if name == "disable_adapter_reference" else lambda: llama(num_layers=3, hidden=32)
    model = build()
    model.train()
    losses, released = [], True
    if sharded:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=EPS)
        engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0,
                                            "zero_optimization": {"stage": 3, "reduce_bucket_size": 3000,
                                                                  "stage3_param_persistence_threshold": 0, **zero}},
                                    optimizer=opt)
        for step in range(NUM_STEPS):
            loss = SCENARIOS[name](model, rank, step, engine.backward)
            if loss is not None:
                engine.backward(loss)
            else:
                loss = torch.zeros(())
            engine.step()
            losses.append(loss.item())
            released &= all(p.numel() == 0 for p in model.parameters())
        engine.destroy()
    else:
        reference = _Reference(model, world)
        for step in range(NUM_STEPS):
            loss = SCENARIOS[name](model, rank, step, torch.Tensor.backward)
            if loss is not None:
                loss.backward()
            else:
                loss = torch.zeros(())
            reference.step()
            losses.append(loss.item())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, params, released


def pass_scenarios(rank: int, world: int, prefetches: tuple = (0, 10**9)) -> dict:
    out = {}
    for name in SCENARIOS:
        ref_losses, ref_params, _ = _run(name, rank, world, False, {})
        for prefetch in prefetches:
            try:   # one scenario's failure is reported as such (every rank fails alike)
                losses, params, released = _run(name, rank, world, True, {"stage3_prefetch_bucket_size": prefetch})
            except Exception as error:  # noqa: BLE001
                out[(name, prefetch)] = {"error": f"{type(error).__name__}: {error}"}
                continue
            diff = max((params[n] - ref_params[n]).abs().max().item() for n in ref_params)
            out[(name, prefetch)] = {"ref": ref_losses, "losses": losses, "param_diff": diff, "released": released}
    return out
