"""LR schedules and the dynamic loss scaler against DeepSpeed 0.19.8's own classes.

The expected values are in tests/data/deepspeed_schedules.json, recorded from DeepSpeed's
``lr_schedules`` and ``fp16.loss_scaler`` by tests/fixtures/make_schedule_references.py (run
by hand; CI has no DeepSpeed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_zero.checkpoint.deepspeed_import import _lr_scheduler
from hf_zero.config import load_config
from hf_zero.optim.loss_scaler import DynamicLossScaler, LossScaleAtMinimumError, build_loss_scaler
from hf_zero.optim.lr_schedules import build_scheduler

REFERENCE = json.loads((Path(__file__).parent / "data" / "deepspeed_schedules.json").read_text())
SCHEDULES, SCALERS = REFERENCE["schedules"], REFERENCE["scalers"]


def _optimizer(group_lrs: list[float]) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in group_lrs])


def _scheduler(case: dict, optimizer: torch.optim.Optimizer):
    config = load_config({"scheduler": {"type": case["type"], "params": case["params"]}})
    return build_scheduler(config.scheduler, optimizer)


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def _lrs_used(optimizer, scheduler, steps: int) -> list[list[float]]:
    """The Trainer / engine protocol: lr read by each optimizer step, then scheduler.step()."""
    out = []
    for _ in range(steps):
        out.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_matches_deepspeed_step_for_step(name):
    case = SCHEDULES[name]
    optimizer = _optimizer(case["group_lrs"])
    got = _lrs_used(optimizer, _scheduler(case, optimizer), len(case["lr_used_by_step"]))
    assert _flat(got) == pytest.approx(_flat(case["lr_used_by_step"]), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_state_saved_and_resumed_mid_run(name):
    """hf_zero's own checkpoint route: state_dict after k steps into a fresh scheduler, with the
    optimizer's lr restored as the checkpoint's param_groups restore it."""
    case = SCHEDULES[name]
    want = case["lr_used_by_step"]
    for k in (1, 2, 5):
        optimizer = _optimizer(case["group_lrs"])
        scheduler = _scheduler(case, optimizer)
        _lrs_used(optimizer, scheduler, k)
        state, group_lrs = scheduler.state_dict(), [g["lr"] for g in optimizer.param_groups]
        fresh_optimizer = _optimizer(case["group_lrs"])
        fresh = _scheduler(case, fresh_optimizer)
        fresh.load_state_dict(state)
        for group, lr in zip(fresh_optimizer.param_groups, group_lrs):
            group["lr"] = lr
        got = _lrs_used(fresh_optimizer, fresh, len(want) - k)
        assert _flat(got) == pytest.approx(_flat(want[k:]), rel=1e-12, abs=1e-15), (name, k)


def test_state_from_before_the_alignment_resumes_on_deepspeeds_timing():
    """A state saved by hf_zero's earlier schedule (lr indexed by last_epoch itself) after 5
    steps: same keys, so it loads; the first resumed step reuses the stored lr (DeepSpeed's
    step 7 lr, one step early), then DeepSpeed's sequence (docs/checkpoints.md)."""
    case = SCHEDULES["warmup_log"]
    want = case["lr_used_by_step"]
    old_lr = want[6]   # the earlier schedule's lr after 5 steps is DeepSpeed's at iteration 5
    old_state = {"min_lr": 0.001, "max_lr": 0.01, "warmup_steps": 10, "warmup_type": "log",
                 "base_lrs": case["group_lrs"], "last_epoch": 5, "_step_count": 6, "_is_initial": False,
                 "_get_lr_called_within_step": False, "_last_lr": old_lr}
    optimizer = _optimizer(case["group_lrs"])
    scheduler = _scheduler(case, optimizer)
    scheduler.load_state_dict(old_state)
    for group, lr in zip(optimizer.param_groups, old_lr):
        group["lr"] = lr
    got = _lrs_used(optimizer, scheduler, len(want) - 5)
    assert _flat(got) == pytest.approx(_flat([old_lr] + want[6:]), rel=1e-12)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_imported_deepspeed_position_continues_deepspeeds_schedule(name):
    """import-deepspeed's scheduler state for DeepSpeed's last_batch_iteration after k steps
    gives the lr DeepSpeed's step k + 1 used, and continues from there."""
    case = SCHEDULES[name]
    lr = case["group_lrs"][0]
    ds_config = {"scheduler": {"type": case["type"], "params": case["params"]},
                 "optimizer": {"type": "AdamW", "params": {"lr": lr}}}
    want = [lrs[0] for lrs in case["lr_used_by_step"]]
    for k in (0, 1, 2, 4, 9):
        iteration = -1 if k == 0 else case["last_batch_iteration_after_step"][k - 1]
        state = _lr_scheduler({"lr_scheduler": {"last_batch_iteration": iteration}}, ds_config, 1)
        assert state["_last_lr"] == pytest.approx([want[k]], rel=1e-12, abs=1e-15), (name, k)
        optimizer = _optimizer([lr])
        scheduler = _scheduler(case, optimizer)
        scheduler.load_state_dict(state)
        optimizer.param_groups[0]["lr"] = state["_last_lr"][0]   # as the import's param_groups carry it
        got = [lrs[0] for lrs in _lrs_used(optimizer, scheduler, len(want) - k)]
        assert got == pytest.approx(want[k:], rel=1e-12, abs=1e-15), (name, k)


def test_import_without_a_numeric_lr_keeps_the_schedule_unimported():
    # WarmupLR scales the optimizer's lr; with "auto" or no lr in ds_config the position is not
    # imported (warned), where before the dummy optimizer raised a TypeError.
    for lr in ("auto", None):
        params = {} if lr is None else {"lr": lr}
        ds_config = {"optimizer": {"type": "AdamW", "params": params}, "scheduler": {"type": "WarmupLR"}}
        assert _lr_scheduler({"lr_scheduler": {"last_batch_iteration": 5}}, ds_config, 1) is None


def test_decay_needs_total_steps():
    with pytest.raises(Exception, match="total_num_steps"):
        _scheduler({"type": "WarmupDecayLR", "params": {}}, _optimizer([0.1]))


def test_null_warmup_values_are_refused_by_name():
    # null passes the parser for "auto"-capable fields; before, it crashed later inside the schedule.
    with pytest.raises(Exception, match="warmup_min_lr.*not null"):
        _scheduler({"type": "WarmupLR", "params": {"warmup_min_lr": None}}, _optimizer([0.1]))
    with pytest.raises(Exception, match="warmup_num_steps.*not null"):
        _scheduler({"type": "WarmupLR", "params": {"warmup_num_steps": None}}, _optimizer([0.1]))


def _scaler(config: dict) -> DynamicLossScaler:
    return build_loss_scaler(load_config({"fp16": {"enabled": True, **config}}).fp16)


@pytest.mark.parametrize("name", sorted(SCALERS))
def test_dynamic_scaler_matches_deepspeed_update_for_update(name):
    case = SCALERS[name]
    scaler = _scaler(case["config"])
    for i, (mark, want) in enumerate(zip(case["pattern"], case["after_each_update"])):
        if "error" in want:
            with pytest.raises(LossScaleAtMinimumError, match="min_loss_scale"):
                scaler.update(mark == "O")
            return
        scaler.update(mark == "O")
        assert (scaler.scale, scaler.remaining_hysteresis) == (want["scale"], want["hysteresis"]), (name, i)


@pytest.mark.parametrize("name", sorted(SCALERS))
def test_dynamic_scaler_state_resumes_mid_run(name):
    case = SCALERS[name]
    pattern, want = case["pattern"], case["after_each_update"]
    cut = len(want) // 2
    scaler = _scaler(case["config"])
    for mark in pattern[:cut]:
        scaler.update(mark == "O")
    resumed = _scaler(case["config"])
    resumed.load_state_dict(json.loads(json.dumps(scaler.state_dict())))
    for mark, expected in zip(pattern[cut:], want[cut:]):
        if "error" in expected:
            with pytest.raises(LossScaleAtMinimumError):
                resumed.update(mark == "O")
            return
        resumed.update(mark == "O")
        assert resumed.scale == expected["scale"], name


def test_static_and_disabled_scaling():
    assert build_loss_scaler(load_config({"fp16": {"enabled": True, "loss_scale": 128}}).fp16).scale == 128
    assert build_loss_scaler(load_config({}).fp16).scale == 1.0
    assert build_loss_scaler(load_config({"fp16": {"enabled": True}}).fp16).scale == 2.0 ** 16


ACCELERATE_LOOP = """
import json, sys, torch
from accelerate import Accelerator
from hf_zero.integrations.accelerate import prepare_accelerate
case = json.loads(sys.argv[1])
torch.manual_seed(0)
config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
          "scheduler": {"type": case["type"], "params": case["params"]}}
model, optimizer = prepare_accelerate(Accelerator(cpu=True), torch.nn.Linear(4, 4), config=config,
                                      micro_batch_size=2)
lrs = []
for _ in range(len(case["lr_used_by_step"])):
    lrs.append(optimizer.param_groups[0]["lr"])
    model(torch.randn(2, 4)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
print(json.dumps(lrs))
"""


def test_config_scheduler_steps_under_accelerate():
    """prepare_accelerate returns no scheduler: hf_zero steps the config's after each optimizer
    step, as DeepSpeed's engine does under accelerate (it stayed at warmup_min_lr before)."""
    case = SCHEDULES["decay_linear"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", ACCELERATE_LOOP, json.dumps(case)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == pytest.approx([lrs[0] for lrs in case["lr_used_by_step"]], rel=1e-12, abs=1e-15)
