"""One epoch of training (AMP, warmup, clipping), inference and COCO evaluation; the same code on one or many
processes (under ``torch.distributed`` the losses are averaged over processes and the results gathered)."""
from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from pycocotools.coco import COCO
from tqdm import tqdm

from train_utils import distributed
from train_utils.coco_results import outputs_to_coco_results


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the epoch, iteration and loss terms."""


def collate_fn(batch: Sequence[tuple[Any, Any]]) -> tuple[tuple[Any, ...], ...]:
    """``[(image, target), ...]`` -> ``(images, targets)``: detection models take lists, not stacked tensors."""
    return tuple(zip(*batch))


def warmup_factor(iteration: int, warmup_iters: int, start_factor: float) -> float:
    """Linear warmup: ``start_factor`` at iteration 0 rising to 1 at ``warmup_iters`` (1 from then on)."""
    if iteration >= warmup_iters:
        return 1.0
    alpha = iteration / warmup_iters
    return start_factor * (1.0 - alpha) + alpha


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


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable,
    device: torch.device,
    epoch: int,
    *,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    warmup_iters: int = 0,
    warmup_start_factor: float = 1e-3,
    iteration_offset: int = 0,
    clip_grad_norm: float | None = None,
    print_freq: int = 10,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train one epoch; returns the epoch mean of every loss term and of their sum (``"loss"``), averaged over
    processes, plus ``images_per_s`` (all processes together) and ``epoch_time_s``.

    The model returns its (already weighted) loss terms in training mode. ``amp_dtype`` turns autocast on;
    ``scaler`` (float16) scales the loss. The lr rises linearly over the first ``warmup_iters`` iterations of
    the run (this epoch's first iteration is the run's ``iteration_offset``) and is restored afterwards. A non-finite loss on any process raises ``NonFiniteLossError`` on every
    process before the optimizer step, so the weights stay those of the last good step.
    """
    model.train()
    world_size = distributed.get_world_size()
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    names: list[str] | None = None
    sums: torch.Tensor | None = None
    steps = images_seen = 0
    start = time.perf_counter()
    bar = tqdm(data_loader, desc=f"epoch {epoch}", unit="it", disable=None if show_progress else True,
               dynamic_ncols=True)
    try:
        for iteration, (images, targets) in enumerate(bar):
            if iteration_offset + iteration < warmup_iters:
                factor = warmup_factor(iteration_offset + iteration, warmup_iters, warmup_start_factor)
                for group, base_lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base_lr * factor
            elif iteration_offset + iteration == warmup_iters:
                for group, base_lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base_lr
            images, targets = _to_device(images, targets, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss_dict = model(images, targets)
            loss = sum(loss_dict.values())

            # one collective per step: every process's loss terms (and a NaN anywhere reaches all of them)
            terms = torch.stack([v.detach().float() for v in loss_dict.values()] + [loss.detach().float()])
            per_rank = distributed.all_gather_tensor(terms)
            if names is None:
                names = [*loss_dict.keys(), "loss"]
            if not torch.isfinite(per_rank).all():
                bad_ranks = [r for r in range(per_rank.shape[0]) if not torch.isfinite(per_rank[r]).all()]
                where = f" on process {', '.join(map(str, bad_ranks))}" if world_size > 1 else ""
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch}, iteration {iteration}{where}: "
                    f"{_format_terms(names, per_rank[bad_ranks[0]].tolist())}; training stopped, the last "
                    "checkpoint is untouched (try a lower --lr, --clip-grad-norm or --warmup-iters)"
                )
            mean_terms = per_rank.mean(dim=0).cpu()

            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if clip_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                optimizer.step()

            sums = mean_terms if sums is None else sums + mean_terms
            steps += 1
            images_seen += len(images) * world_size
            if iteration % print_freq == 0 or iteration == len(bar) - 1:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{sums[-1].item() / steps:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.6f}",
                                img_s=f"{images_seen / max(elapsed, 1e-9):.1f}", refresh=False)
    finally:
        bar.close()
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr
    elapsed = time.perf_counter() - start
    if steps == 0:
        raise ValueError("the training data loader yielded no batch")
    means = {name: value / steps for name, value in zip(names, sums.tolist())}
    return {"loss": means.pop("loss"), **means, "images_per_s": images_seen / max(elapsed, 1e-9),
            "epoch_time_s": elapsed}


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
    min_overlap_area: float = 20.0,
    show_progress: bool = False,
) -> dict[str, Any]:
    """The evaluation record (``train_utils.coco_eval.evaluate_results``) of ``model`` on the loader's images.

    Under ``torch.distributed`` each process predicts its shard, process 0 evaluates the gathered results and every
    process returns the same record: the numbers equal a one-process evaluation. ``label_names`` maps model labels
    to names. Pass the bare model, not its ``DistributedDataParallel`` wrapper.
    """
    from train_utils.coco_eval import evaluate_results

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
