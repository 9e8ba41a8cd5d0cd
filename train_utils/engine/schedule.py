"""The learning rate: its default for a total batch, one per-optimizer-step schedule (linear warmup, then cosine
or multistep decay) as a single ``LambdaLR`` that a checkpoint saves and a resume loads, and the lines that say
which lr and schedule a run got.

The reference recipe (stock torchvision Mask R-CNN on BioImLab, from scratch): lr 0.02 for a batch of 4, a linear
warmup over the first 300 optimizer steps from 0.001x, cosine decay to 0 over the run, gradient norms clipped at 10.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from errors import UserError

if TYPE_CHECKING:
    from train_utils.engine.run_config import ScheduleSettings

REFERENCE_LR = 0.02
REFERENCE_BATCH = 4
DEFAULT_WARMUP_ITERS = 300
LR_SCHEDULE_PER_STEP = "per_step"  # what checkpoints' ``lr_schedule`` says: their lr_scheduler counts optimizer steps


def scaled_lr(total_batch: int, lr_per_reference_batch: float = REFERENCE_LR) -> float:
    """The linear scaling rule: ``lr_per_reference_batch`` per ``REFERENCE_BATCH`` images, scaled to ``total_batch``."""
    return lr_per_reference_batch * total_batch / REFERENCE_BATCH


def default_warmup_iters(total_steps: int) -> int:
    """300 steps as the reference, but at most half of a short run (a run of 40 steps warms up over 20)."""
    return min(DEFAULT_WARMUP_ITERS, total_steps // 2)


def fit_accumulation(asked: int, batches_per_epoch: int) -> int:
    """``--accumulate-steps`` clamped to the batches an epoch has: a group never spans two epochs, so 50 asked of a
    2-batch epoch sums 2, and the lr must be scaled to those."""
    return asked if asked <= batches_per_epoch else max(batches_per_epoch, 1)


def accumulation_note(asked: int, accumulate_steps: int, batches_per_epoch: int) -> str | None:
    """The line that says ``--accumulate-steps`` was clamped, or None when it fitted."""
    if asked == accumulate_steps:
        return None
    return (f"note: --accumulate-steps {asked} is more than the {batches_per_epoch} batch(es) an epoch has; each "
            f"optimizer step sums the whole epoch, --accumulate-steps {accumulate_steps}, and the lr is scaled "
            "to that batch")


def lr_line(lr: float, given: bool, world_size: int, batch_size: int, accumulate_steps: int) -> str:
    """Where the base lr came from: ``--lr`` (``given``), or the scaling rule for the total batch."""
    batch = world_size * batch_size * accumulate_steps
    if given:
        return f"lr {lr:g} (--lr) for a total batch of {batch}"
    return (f"lr {lr:g}: {REFERENCE_LR:g} per {REFERENCE_BATCH} images scaled to a total batch of {batch} "
            f"({world_size} process(es) x -b {batch_size} x --accumulate-steps {accumulate_steps}); --lr sets it")


def schedule_line(settings: "ScheduleSettings", clip_grad_norm: float) -> str:
    """The schedule a run got, in the words of its flags."""
    return (f"{settings.scheduler} schedule over {settings.epochs} epochs of {settings.steps_per_epoch} optimizer "
            f"step(s), warmup {settings.warmup_iters} step(s), gradient clipping {clip_grad_norm or 'off'}")


def lr_factor(
    step: int,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_iters: int = 0,
    warmup_factor: float = 1e-3,
    scheduler: str = "cosine",
    lr_steps: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """The lr of optimizer step ``step`` (0-based, over the whole run) relative to the base lr.

    Warmup rises linearly from ``warmup_factor`` at step 0 to 1 at ``warmup_iters``. It multiplies the decay: cosine
    from 1 at step 0 to 0 at ``total_steps``, or ``gamma`` once per epoch of ``lr_steps`` reached (multistep).
    """
    warm = 1.0
    if step < warmup_iters:
        alpha = step / warmup_iters
        warm = warmup_factor * (1.0 - alpha) + alpha
    if scheduler == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    elif scheduler == "multistep":
        epoch = step // max(steps_per_epoch, 1)
        decay = gamma ** sum(epoch >= milestone for milestone in lr_steps)
    else:
        raise ValueError(f"unknown lr schedule {scheduler!r}; choose cosine or multistep")
    return warm * decay


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_iters: int = 0,
    warmup_factor: float = 1e-3,
    scheduler: str = "cosine",
    lr_steps: Sequence[int] = (),
    gamma: float = 0.1,
    start_step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of ``lr_factor`` to be stepped after every optimizer step; it sets the lr of ``start_step``
    (the next step to run) now, from each group's ``initial_lr`` when it has one, else its ``lr``."""
    factor = functools.partial(lr_factor, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                               warmup_iters=warmup_iters, warmup_factor=warmup_factor, scheduler=scheduler,
                               lr_steps=tuple(lr_steps), gamma=gamma)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    # LambdaLR's first step moves it from start_step - 1 to start_step and sets that step's lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def make_schedule(optimizer: torch.optim.Optimizer, settings: "ScheduleSettings",
                  start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's per-step lr schedule, placed at optimizer step ``start_step``."""
    return make_lr_scheduler(optimizer, total_steps=settings.total_steps, steps_per_epoch=settings.steps_per_epoch,
                             warmup_iters=settings.warmup_iters, warmup_factor=settings.warmup_factor,
                             scheduler=settings.scheduler, lr_steps=settings.lr_steps, gamma=settings.gamma,
                             start_step=start_step)


def check_resumable(checkpoint: Mapping[str, Any], path: object) -> None:
    """Refuse a checkpoint whose lr schedule counted epochs (written before the per-step schedule): its position
    cannot be placed on the per-step schedule exactly."""
    if checkpoint.get("lr_schedule") != LR_SCHEDULE_PER_STEP:
        raise UserError(f"{path} holds no per-step lr schedule (it was written by an older train.py, whose schedule "
                          "counted epochs) and cannot be resumed; validate or predict with it, or start a new run")


def resume_schedule(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
                    state: Mapping[str, Any], base_lr: float) -> str | None:
    """Load a checkpoint's schedule state (``lr_scheduler``), keeping ``base_lr`` when it is not the checkpoint's;
    returns the line that says so, or None."""
    lr_scheduler.load_state_dict(state)
    saved_lr = lr_scheduler.base_lrs[0]
    if math.isclose(saved_lr, base_lr, rel_tol=1e-9):
        return None
    set_base_lr(optimizer, lr_scheduler, base_lr)
    return f"resuming with base lr {base_lr:g} instead of the checkpoint's {saved_lr:g}"


def set_base_lr(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
                base_lr: float) -> None:
    """Set the schedule's base lr (a resume with a new ``--lr``) and the lr of its current position (the next step)."""
    lr_scheduler.base_lrs = [base_lr for _ in optimizer.param_groups]
    step = lr_scheduler.last_epoch
    for group, fn in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * fn(step)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
