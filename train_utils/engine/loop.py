"""One epoch of training (AMP, gradient accumulation, clipping, a per-step lr schedule), inference and COCO
evaluation; the same code on one or many processes (under ``torch.distributed`` the losses are averaged over
processes and the results gathered)."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from pycocotools.coco import COCO
from tqdm import tqdm

from overlaps import MIN_OVERLAP_AREA
from train_utils.engine import distributed
from train_utils.outputs.predictions import outputs_to_coco_results


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the epoch, iteration and loss terms."""


def collate_fn(batch: Sequence[tuple[Any, Any]]) -> tuple[tuple[Any, ...], ...]:
    """``[(image, target), ...]`` -> ``(images, targets)``: detection models take lists, not stacked tensors."""
    return tuple(zip(*batch))


def amp_dtype_from_name(name: str | None) -> torch.dtype | None:
    """``"float16"`` / ``"bfloat16"`` -> the torch dtype; None -> None (full precision)."""
    return None if name is None else {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


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
    world_size = distributed.get_world_size()
    num_batches = len(data_loader)
    names: list[str] | None = None
    sums: torch.Tensor | None = None
    steps = images_seen = optimizer_steps = 0
    last_lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with tqdm(data_loader, desc=f"epoch {epoch}", unit="it", disable=None if show_progress else True,
              dynamic_ncols=True) as bar:
        for iteration, (images, targets) in enumerate(bar):
            group_start = iteration - iteration % accumulate_steps
            group_size = min(accumulate_steps, num_batches - group_start)
            last_in_group = iteration == group_start + group_size - 1
            images, targets = _to_device(images, targets, device)
            no_sync = getattr(model, "no_sync", None)
            with contextlib.nullcontext() if last_in_group or no_sync is None else no_sync():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss_dict = model(images, targets)
                loss = weighted_loss(loss_dict, loss_weights)
                # one collective per batch: every process's loss terms (and a NaN anywhere reaches all of them)
                terms = torch.stack([v.detach().float() for v in loss_dict.values()] + [loss.detach().float()])
                per_rank = distributed.all_gather_tensor(terms)
                names = names or [*loss_dict.keys(), "loss"]
                _check_finite(per_rank, names, epoch, iteration)
                (scaler.scale(loss / group_size) if scaler is not None else loss / group_size).backward()
            if last_in_group:
                last_lr = optimizer.param_groups[0]["lr"]
                _optimizer_step(model, optimizer, scaler, clip_grad_norm)
                optimizer_steps += 1
                if lr_scheduler is not None:
                    lr_scheduler.step()

            mean_terms = per_rank.mean(dim=0).cpu()
            sums = mean_terms if sums is None else sums + mean_terms
            steps += 1
            images_seen += len(images) * world_size
            if iteration % print_freq == 0 or iteration == num_batches - 1:
                running = {name: value / steps for name, value in zip(names, sums.tolist())}
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{running['loss']:.4f}", lr=f"{last_lr:.6f}",
                                img_s=f"{images_seen / max(elapsed, 1e-9):.1f}", refresh=False)
                if on_log is not None:
                    on_log(iteration, {**dict(zip(names, mean_terms.tolist())), "lr": last_lr})
    elapsed = time.perf_counter() - start
    if steps == 0:
        raise ValueError("the training data loader yielded no batch")
    means = {name: value / steps for name, value in zip(names, sums.tolist())}
    return {"loss": means.pop("loss"), **means, "lr": last_lr, "optimizer_steps": optimizer_steps,
            "images_per_s": images_seen / max(elapsed, 1e-9), "epoch_time_s": elapsed}


@torch.inference_mode()
def iter_predictions(
    model: torch.nn.Module,
    data_loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    show_progress: bool = False,
) -> Iterator[tuple[list[dict[str, torch.Tensor]], list[int]]]:
    """Per batch of this process's loader: ``(outputs on the CPU in float32, image ids)``."""
    model.eval()
    for images, targets in tqdm(data_loader, desc="eval", unit="img", disable=None if show_progress else True,
                                dynamic_ncols=True):
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
        outputs = [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out.items()} for out in outputs]
        yield outputs, [int(t["image_id"]) for t in targets]


def predict_results(
    model: torch.nn.Module,
    data_loader: Iterable,
    device: torch.device,
    label_to_cat_id: Mapping[int, int],
    amp_dtype: torch.dtype | None = None,
    mask_threshold: float = 0.5,
    show_progress: bool = False,
) -> tuple[list[dict[str, Any]], list[int]]:
    """COCO results of the whole loader (all processes' shards gathered, in image-id order) and the image ids."""
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    for outputs, ids in iter_predictions(model, data_loader, device, amp_dtype, show_progress):
        results.extend(outputs_to_coco_results(outputs, ids, label_to_cat_id, mask_threshold))
        image_ids.extend(ids)
    shards = distributed.all_gather_object((results, image_ids))
    results = sorted((r for shard, _ in shards for r in shard), key=lambda r: r["image_id"])  # stable: keeps order
    return results, sorted(i for _, ids in shards for i in ids)


def evaluate(
    model: torch.nn.Module,
    data_loader: Iterable,
    device: torch.device,
    coco_gt: COCO,
    label_to_cat_id: Mapping[int, int],
    score_thresh: float = 0.5,
    *,
    label_names: Mapping[int, str] | None = None,
    amp_dtype: torch.dtype | None = None,
    mask_threshold: float = 0.5,
    min_overlap_area: float = MIN_OVERLAP_AREA,
    show_progress: bool = False,
) -> dict[str, Any]:
    """The evaluation record (``train_utils.evaluation.coco_eval.evaluate_results``) of ``model`` on the loader's images.

    Under ``torch.distributed`` each process predicts its shard, process 0 evaluates the gathered results and every
    process returns the same record: the numbers equal a one-process evaluation. ``label_names`` maps model labels
    to names. Pass the bare model, not its ``DistributedDataParallel`` wrapper.
    """
    from train_utils.evaluation.coco_eval import evaluate_results

    results, image_ids = predict_results(model, data_loader, device, label_to_cat_id, amp_dtype, mask_threshold,
                                         show_progress)
    outcome: tuple[str, Any] = ("ok", None)
    if distributed.get_rank() == 0:
        cat_names = {int(label_to_cat_id[int(k)]): v for k, v in label_names.items()} if label_names else None
        try:
            outcome = ("ok", evaluate_results(coco_gt, results, score_thresh, cat_names, image_ids=image_ids,
                                              min_overlap_area=min_overlap_area))
        except ValueError as exc:  # every process must learn of it, or the others wait in the broadcast
            outcome = ("error", str(exc))
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        raise ValueError(outcome[1])
    return outcome[1]
