"""One epoch of training (AMP, gradient accumulation, clipping, a per-step lr schedule); the same code on one or
many processes (under ``torch.distributed`` the losses are averaged over processes)."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from tqdm import tqdm

from train_utils import distributed


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the epoch, iteration and loss terms."""


def amp_dtype_from_name(name: str | None) -> torch.dtype | None:
    """``"float16"`` / ``"bfloat16"`` -> the torch dtype; None -> None (full precision)."""
    return None if name is None else {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def resolve_amp(amp: bool | None, amp_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that ``--amp`` / ``--amp-dtype`` ask for; ``amp`` None means on for CUDA, off on the CPU
    (float16 autocast is far slower there), as the reference recipe trained."""
    on = device.type == "cuda" if amp is None else amp
    return amp_dtype_from_name(amp_dtype) if on else None


def _to_device(images: Iterable[torch.Tensor], targets: Iterable[Mapping[str, Any]], device: torch.device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def _format_terms(names: Sequence[str], values: Sequence[float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in zip(names, values))


def _check_finite(per_rank: torch.Tensor, names: Sequence[str], epoch: int, iteration: int) -> None:
    """Raise ``NonFiniteLossError`` (on every process alike) when any process's loss terms are not finite."""
    if torch.isfinite(per_rank).all():
        return
    bad_ranks = [r for r in range(per_rank.shape[0]) if not torch.isfinite(per_rank[r]).all()]
    where = f" on process {', '.join(map(str, bad_ranks))}" if per_rank.shape[0] > 1 else ""
    raise NonFiniteLossError(
        f"non-finite loss at epoch {epoch}, iteration {iteration}{where}: "
        f"{_format_terms(names, per_rank[bad_ranks[0]].tolist())}; training stopped, the last checkpoint is "
        "untouched (try a lower --lr, a lower --clip-grad-norm or more --warmup-iters)"
    )


def _optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    clip_grad_norm: float | None) -> None:
    """Clip (after unscaling) and apply the accumulated gradients, then clear them."""
    if scaler is not None and clip_grad_norm:
        scaler.unscale_(optimizer)
    if clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def weighted_loss(loss_dict: Mapping[str, torch.Tensor], loss_weights: Mapping[str, float] | None = None
                  ) -> torch.Tensor:
    """The sum of the loss terms, each times its weight in ``loss_weights`` (terms not listed weigh 1)."""
    weights = loss_weights or {}
    return sum(value * weights.get(name, 1.0) for name, value in loss_dict.items())


class _EpochMeans:
    """Running sums of the loss terms (averaged over processes) and of the images seen in an epoch."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.batches = self.images = 0
        self.start = time.perf_counter()

    def add(self, names: list[str], mean_terms: torch.Tensor, images: int) -> None:
        self.names = names
        self.sums = mean_terms if self.sums is None else self.sums + mean_terms
        self.batches += 1
        self.images += images

    def means(self) -> dict[str, float]:
        return {name: value / self.batches for name, value in zip(self.names, self.sums.tolist())}

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def _forward_backward(model: torch.nn.Module, images, targets, epoch: int, iteration: int, *, amp_dtype, loss_weights,
                      scaler, divisor: int, sync: bool) -> tuple[list[str], torch.Tensor]:
    """One batch's forward and backward (gradients divided by ``divisor``; DDP syncs only when ``sync``); returns the
    loss names and every process's loss terms ``[processes, terms]``, checked finite on every process first."""
    no_sync = getattr(model, "no_sync", None)
    with contextlib.nullcontext() if sync or no_sync is None else no_sync():
        with torch.autocast(images[0].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss_dict = model(images, targets)
        loss = weighted_loss(loss_dict, loss_weights)
        # one collective per batch: every process's loss terms (and a NaN anywhere reaches all of them)
        terms = torch.stack([v.detach().float() for v in loss_dict.values()] + [loss.detach().float()])
        per_rank = distributed.all_gather_tensor(terms)
        names = [*loss_dict.keys(), "loss"]
        _check_finite(per_rank, names, epoch, iteration)
        (scaler.scale(loss / divisor) if scaler is not None else loss / divisor).backward()
    return names, per_rank


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable,
    device: torch.device,
    epoch: int,
    *,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    clip_grad_norm: float | None = None,
    accumulate_steps: int = 1,
    loss_weights: Mapping[str, float] | None = None,
    print_freq: int = 10,
    show_progress: bool = True,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train one epoch; returns the epoch mean of every loss term as the model returns it (unweighted) and of the
    loss that is minimised (``"loss"``: the terms' sum, each weighted by ``loss_weights``, unlisted terms 1), averaged
    over processes, plus the ``lr`` of the last optimizer step, ``optimizer_steps``, ``images_per_s`` (all
    processes together) and ``epoch_time_s``.

    Each optimizer step sums the gradients of ``accumulate_steps`` batches, each loss scaled by 1 / the batches in
    its group (the epoch's last group may be shorter); under DDP gradients synchronise on a group's last batch only.
    ``lr_scheduler`` is stepped after every optimizer step; ``clip_grad_norm`` (0 or None: off) and the float16
    ``scaler`` act once per optimizer step. A non-finite loss on any process raises ``NonFiniteLossError`` on every
    process before the group's optimizer step, so the weights stay those of the last good step. Every
    ``print_freq`` batches ``on_log(iteration, values)`` gets that batch's loss terms (averaged over processes) and
    the lr of the last optimizer step.
    """
    model.train()
    num_batches, world_size = len(data_loader), distributed.get_world_size()
    meter, optimizer_steps, last_lr = _EpochMeans(), 0, optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    with tqdm(data_loader, desc=f"epoch {epoch}", unit="it", disable=None if show_progress else True,
              dynamic_ncols=True) as bar:
        for iteration, (images, targets) in enumerate(bar):
            group_start = iteration - iteration % accumulate_steps
            group_size = min(accumulate_steps, num_batches - group_start)
            last_in_group = iteration == group_start + group_size - 1
            images, targets = _to_device(images, targets, device)
            names, per_rank = _forward_backward(model, images, targets, epoch, iteration, amp_dtype=amp_dtype,
                                                loss_weights=loss_weights, scaler=scaler, divisor=group_size,
                                                sync=last_in_group)
            if last_in_group:
                last_lr = optimizer.param_groups[0]["lr"]
                _optimizer_step(model, optimizer, scaler, clip_grad_norm)
                optimizer_steps += 1
                if lr_scheduler is not None:
                    lr_scheduler.step()
            mean_terms = per_rank.mean(dim=0).cpu()
            meter.add(names, mean_terms, len(images) * world_size)
            if iteration % print_freq == 0 or iteration == num_batches - 1:
                bar.set_postfix(loss=f"{meter.means()['loss']:.4f}", lr=f"{last_lr:.6f}",
                                img_s=f"{meter.images_per_s():.1f}", refresh=False)
                if on_log is not None:
                    on_log(iteration, {**dict(zip(names, mean_terms.tolist())), "lr": last_lr})
    if meter.batches == 0:
        raise ValueError("the training data loader yielded no batch")
    means = meter.means()
    return {"loss": means.pop("loss"), **means, "lr": last_lr, "optimizer_steps": optimizer_steps,
            "images_per_s": meter.images_per_s(), "epoch_time_s": time.perf_counter() - meter.start}
