"""LR schedules against DeepSpeed's formulas, and the dynamic loss scaler's state machine."""

import math

import pytest
import torch

from hf_zero.config import load_config
from hf_zero.optim.loss_scaler import DynamicLossScaler, build_loss_scaler
from hf_zero.optim.lr_schedules import build_scheduler


def lrs(kind: str, params: dict, steps: int, base_lr: float = 0.5) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    sched = build_scheduler(load_config({"scheduler": {"type": kind, "params": params}}).scheduler, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_lr_log_and_linear():
    got = lrs("WarmupLR", {"warmup_min_lr": 0.1, "warmup_max_lr": 1.0, "warmup_num_steps": 10}, 12)
    expected = [0.1 + 0.9 * math.log(t + 1) / math.log(10) if t < 10 else 1.0 for t in range(12)]
    assert got == pytest.approx(expected)
    got = lrs("WarmupLR", {"warmup_max_lr": 1.0, "warmup_num_steps": 4, "warmup_type": "linear"}, 6)
    assert got == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_warmup_decay_reaches_zero():
    got = lrs("WarmupDecayLR", {"warmup_max_lr": 1.0, "warmup_num_steps": 2, "warmup_type": "linear",
                                "total_num_steps": 6}, 8)
    assert got == pytest.approx([0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_warmup_cosine_is_a_ratio_of_the_optimizer_lr():
    got = lrs("WarmupCosineLR", {"warmup_num_steps": 2, "warmup_type": "linear", "total_num_steps": 6,
                                 "cos_min_ratio": 0.0}, 7, base_lr=2.0)
    cos = [(1 + math.cos(math.pi * (t - 2 + 1) / 4)) / 2 for t in range(2, 7)]
    assert got == pytest.approx([0.0, 1.0] + [2.0 * c for c in cos])


def test_decay_needs_total_steps():
    with pytest.raises(Exception, match="total_num_steps"):
        lrs("WarmupDecayLR", {}, 1)


def test_dynamic_scaler_window_hysteresis_and_floor():
    s = DynamicLossScaler(initial_scale_power=4, window=3, hysteresis=2, min_scale=4.0)
    for _ in range(2):
        s.update(False)
    assert s.scale == 16
    s.update(False)
    assert s.scale == 32                                 # 3 clean steps double it
    s.update(True)
    assert s.scale == 32                                 # hysteresis absorbs the first overflow
    s.update(True)
    assert s.scale == 16
    for _ in range(5):
        s.update(True)
    assert s.scale == 4.0                                # never below min_loss_scale


def test_static_and_disabled_scaling():
    assert build_loss_scaler(load_config({"fp16": {"enabled": True, "loss_scale": 128}}).fp16).scale == 128
    assert build_loss_scaler(load_config({}).fp16).scale == 1.0
    assert build_loss_scaler(load_config({"fp16": {"enabled": True}}).fp16).scale == 2.0 ** 16
