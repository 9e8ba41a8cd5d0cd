"""The learning rate: its default for a total batch, and one per-optimizer-step schedule (linear warmup, then cosine
or multistep decay) as a single ``LambdaLR`` that a checkpoint saves and a resume loads.

The reference recipe (stock torchvision Mask R-CNN on BioImLab, from scratch): lr 0.02 for a batch of 4, a linear
warmup over the first 300 optimizer steps from 0.001x, cosine decay to 0 over the run, gradient norms clipped at 10.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

REFERENCE_LR = 0.02
REFERENCE_BATCH = 4
DEFAULT_WARMUP_ITERS = 300


def scaled_lr(total_batch: int, lr_per_reference_batch: float = REFERENCE_LR) -> float:
    """The linear scaling rule: ``lr_per_reference_batch`` per ``REFERENCE_BATCH`` images, scaled to ``total_batch``."""
    return lr_per_reference_batch * total_batch / REFERENCE_BATCH


def default_warmup_iters(total_steps: int) -> int:
    """300 steps as the reference, but at most half of a short run (a run of 40 steps warms up over 20)."""
    return min(DEFAULT_WARMUP_ITERS, total_steps // 2)


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


def set_base_lr(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
                base_lr: float) -> None:
    """Set the schedule's base lr (a resume with a new ``--lr``) and the lr of its current position (the next step)."""
    lr_scheduler.base_lrs = [base_lr for _ in optimizer.param_groups]
    step = lr_scheduler.last_epoch
    for group, fn in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * fn(step)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
