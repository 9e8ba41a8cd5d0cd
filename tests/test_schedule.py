"""The per-step lr schedule: its shape, its default warmup and lr, and resuming it from its state."""
from __future__ import annotations

import math

import pytest
import torch

from train_utils.engine import schedule


def _factor(step, **kwargs):
    return schedule.lr_factor(step, **{"total_steps": 100, "steps_per_epoch": 10, **kwargs})


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    assert _factor(0, warmup_iters=10, warmup_factor=0.001) == pytest.approx(0.001)
    assert _factor(5, warmup_iters=10, warmup_factor=0.001) == pytest.approx(
        (0.001 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert _factor(10, warmup_iters=10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert _factor(50) == pytest.approx(0.5) and _factor(100) == pytest.approx(0.0) == _factor(150)


def test_multistep_counts_epochs_of_steps():
    kwargs = dict(scheduler="multistep", lr_steps=(2, 4), gamma=0.1)
    assert [_factor(s, **kwargs) for s in (0, 19, 20, 39, 40, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="unknown lr schedule"):
        _factor(0, scheduler="step")


def test_defaults_follow_the_reference_and_fit_short_runs():
    assert schedule.scaled_lr(4) == 0.02 and schedule.scaled_lr(1) == 0.005 and schedule.scaled_lr(16) == 0.08
    assert schedule.default_warmup_iters(3300) == 300  # BioImLab: 121 epochs of 28 steps
    assert schedule.default_warmup_iters(40) == 20  # 4 images, batch 4, 40 epochs: warm up over half of it


def _optimizer(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


def test_a_resumed_schedule_continues_exactly():
    kwargs = dict(total_steps=20, steps_per_epoch=4, warmup_iters=6)
    optimizer = _optimizer()
    lr_scheduler = schedule.make_lr_scheduler(optimizer, **kwargs)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        lr_scheduler.step()
        if len(lrs) == 8:
            saved = optimizer.state_dict(), lr_scheduler.state_dict()
    optimizer2 = _optimizer(lr=0.5)  # a resume builds everything anew, then loads the states
    lr_scheduler2 = schedule.make_lr_scheduler(optimizer2, **kwargs)
    optimizer2.load_state_dict(saved[0])
    lr_scheduler2.load_state_dict(saved[1])
    resumed = []
    for _ in range(12):
        resumed.append(optimizer2.param_groups[0]["lr"])
        optimizer2.step()
        lr_scheduler2.step()
    assert resumed == pytest.approx(lrs[8:])


def test_start_step_and_a_new_base_lr_keep_the_position():
    kwargs = dict(total_steps=20, steps_per_epoch=4, warmup_iters=6)
    optimizer = _optimizer()
    lr_scheduler = schedule.make_lr_scheduler(optimizer, start_step=8, **kwargs)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * _factor(8, total_steps=20, warmup_iters=6))
    schedule.set_base_lr(optimizer, lr_scheduler, 0.3)
    optimizer.step()
    lr_scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * _factor(9, total_steps=20, warmup_iters=6))
