"""Single-process engine behaviour: schedulers, API contract, errors for bad optimizers."""

import pytest
import torch

import hf_zero
from parity_cases import batch, tiny_gpt2

CONFIG = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1, "reduce_bucket_size": 4000}}


def one_step(engine, model, step=0):
    x = batch(0, step, 0)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()


def test_torch_lr_scheduler_drives_the_real_update():
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = hf_zero.initialize(model, CONFIG, optimizer=opt,
                                lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.0))
    assert isinstance(engine.optimizer, torch.optim.Optimizer)
    assert engine.optimizer.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    one_step(engine, model)
    # lr 0 and AdamW: the update is exactly weight decay x lr = 0, so nothing moves
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    engine.optimizer.param_groups[0]["lr"] = 1e-2
    one_step(engine, model, 1)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_hf_scheduler_steps_with_the_engine():
    from transformers import get_linear_schedule_with_warmup

    model = tiny_gpt2()
    engine = hf_zero.initialize(model, {**CONFIG, "optimizer": {"type": "AdamW", "params": {"lr": 1.0}}})
    sched = get_linear_schedule_with_warmup(engine.optimizer, num_warmup_steps=2, num_training_steps=10)
    engine.lr_scheduler = sched
    lrs = []
    for step in range(3):
        lrs.append(engine.optimizer.param_groups[0]["lr"])
        one_step(engine, model, step)
    assert lrs == pytest.approx([0.0, 0.5, 1.0])


def test_in_place_contract_and_destroy():
    model = tiny_gpt2()
    engine = hf_zero.initialize(model, CONFIG)
    assert engine.module is model and callable(model.no_sync)
    flat = engine.flat_groups[0].data
    p = model.transformer.h[0].mlp.c_fc.weight
    assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    engine.destroy()
    assert "no_sync" not in model.__dict__ and "zero_grad" not in model.__dict__


def test_accumulation_boundary_sequence():
    model = tiny_gpt2()
    engine = hf_zero.initialize(model, {**CONFIG, "gradient_accumulation_steps": 3})
    seen = []
    for step in range(6):
        seen.append(engine.is_gradient_accumulation_boundary())
        one_step(engine, model, step)
    assert seen == [False, False, True] * 2 and engine.global_steps == 2


def test_optimizer_missing_a_trainable_parameter_is_named():
    model = tiny_gpt2()
    opt = torch.optim.AdamW([model.transformer.wte.weight])
    with pytest.raises(ValueError, match="transformer.wpe.weight"):
        hf_zero.initialize(model, CONFIG, optimizer=opt)


def test_optimizer_with_foreign_tensor_is_rejected():
    model = tiny_gpt2()
    opt = torch.optim.AdamW(list(model.parameters()) + [torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        hf_zero.initialize(model, CONFIG, optimizer=opt)


def test_optimizer_that_already_stepped_is_rejected():
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters())
    x = batch(0, 0, 0)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    with pytest.raises(ValueError, match="before its first step"):
        hf_zero.initialize(model, CONFIG, optimizer=opt)


@pytest.mark.parametrize("bf16", (False, True), ids=("fp32", "bf16"))
@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_destroy_frees_engine_memory_and_hooks(stage, bf16):
    import gc
    import weakref

    model = tiny_gpt2()
    user_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)   # still held by the user afterwards
    engine = hf_zero.initialize(model, {**CONFIG, "bf16": {"enabled": bf16},
                                        "zero_optimization": {"stage": stage, "reduce_bucket_size": 4000,
                                                              "stage3_param_persistence_threshold": 0}},
                                optimizer=user_optimizer)
    one_step(engine, model)
    stage_obj = engine.stage
    grads = getattr(stage_obj, "grad_buffers", None) or stage_obj.grad_shards
    watched = [weakref.ref(t) for t in grads] + [weakref.ref(t) for t in engine.optimizer.state_tensors()]
    watched += [weakref.ref(t) for t in engine.masters.tensors()]   # fp32 masters (bf16 only)
    assert not bf16 or engine.masters.tensors()
    watched.append(weakref.ref(engine))
    engine.destroy()
    del engine, stage_obj, grads
    gc.collect()
    assert all(ref() is None for ref in watched), "gradient buffers / optimizer states / masters outlived destroy()"
    # the model is plain again: whole parameters, no hf_zero hooks, and it still trains
    assert all(p.numel() > 0 and p.grad is None for p in model.parameters())
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    x = batch(0, 1, 0)
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_stage3_destroy_without_unshard_leaves_parameters_empty():
    model = tiny_gpt2()
    engine = hf_zero.initialize(model, {**CONFIG, "zero_optimization": {"stage": 3, "reduce_bucket_size": 4000,
                                                                     "stage3_param_persistence_threshold": 0}})
    one_step(engine, model)
    engine.destroy(unshard=False)
    assert all(p.numel() == 0 for p in model.parameters())   # no rank ever held the whole model
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    assert "zero_grad" not in model.__dict__ and "no_sync" not in model.__dict__


@pytest.mark.parametrize("stage", (1, 2, 3))
def test_grad_norm_is_computed_once_per_gradient_version(stage, monkeypatch):
    # clip_grad_norm_ (Trainer / accelerate) then optimizer.step(): one pass over the gradients
    import hf_zero.optim.zero_optimizer as zero_optimizer

    calls = []
    real = zero_optimizer.global_grad_norm
    monkeypatch.setattr(zero_optimizer, "global_grad_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_gpt2()
    engine = hf_zero.initialize(model, {**CONFIG, "zero_optimization": {"stage": stage, "reduce_bucket_size": 4000,
                                                                     "stage3_param_persistence_threshold": 0}})
    x = batch(0, 0, 0)
    model(input_ids=x, labels=x).loss.backward()
    first = engine.optimizer.grad_norm().item()
    model(input_ids=x, labels=x).loss.backward()      # more gradient: the cached norm is stale
    second = engine.optimizer.grad_norm().item()
    assert len(calls) == 2 and second == pytest.approx(2 * first, rel=1e-5)
    engine.optimizer.step()
    assert len(calls) == 2, "step() must reuse the norm computed for the same gradients"
    assert engine.get_global_grad_norm() == pytest.approx(second, rel=1e-6)
    model(input_ids=x, labels=x).loss.backward()
    model.zero_grad()
    assert engine.optimizer.grad_norm().item() == 0.0 and len(calls) == 3
