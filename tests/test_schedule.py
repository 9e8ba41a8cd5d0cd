"""The per-step lr schedule: its shape, its default warmup and lr, and resuming it from its state."""
from __future__ import annotations

import math

import pytest
import torch

from errors import UserError
from train_utils.engine import schedule
from train_utils.engine.run_config import ScheduleSettings


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


def test_the_settings_build_the_schedule_and_a_resume_keeps_a_new_lr_and_says_so():
    settings = ScheduleSettings(epochs=5, steps_per_epoch=4, warmup_iters=6)
    optimizer = _optimizer()
    lr_scheduler = schedule.make_schedule(optimizer, settings)
    for _ in range(8):
        optimizer.step()
        lr_scheduler.step()
    state = lr_scheduler.state_dict()
    optimizer2 = _optimizer(lr=0.3)
    lr_scheduler2 = schedule.make_schedule(optimizer2, settings)
    assert schedule.resume_schedule(optimizer2, lr_scheduler2, state, 0.3) == (
        "resuming with base lr 0.3 instead of the checkpoint's 0.1")
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(0.3 * _factor(8, total_steps=20, warmup_iters=6))
    optimizer3 = _optimizer()
    assert schedule.resume_schedule(optimizer3, schedule.make_schedule(optimizer3, settings), state, 0.1) is None


def test_a_checkpoint_whose_schedule_counted_epochs_is_refused():
    schedule.check_resumable({"lr_schedule": schedule.LR_SCHEDULE_PER_STEP}, "model_3.pth")
    with pytest.raises(UserError, match="model_3.pth holds no per-step lr schedule .* cannot be resumed"):
        schedule.check_resumable({"epoch": 3, "lr_scheduler": {}}, "model_3.pth")


def test_the_lines_say_where_the_lr_came_from_and_what_was_clamped():
    assert schedule.fit_accumulation(50, 2) == 2 and schedule.fit_accumulation(2, 5) == 2
    assert schedule.accumulation_note(2, 2, 5) is None
    assert "--accumulate-steps 50 is more than the 2 batch(es)" in schedule.accumulation_note(50, 2, 2)
    assert schedule.lr_line(0.004, True, 1, 2, 1) == "lr 0.004 (--lr) for a total batch of 2"
    assert schedule.lr_line(0.02, False, 2, 2, 1).startswith("lr 0.02: 0.02 per 4 images scaled to a total batch of 4")
