"""Scoring a model on a dataset split: the one path of each training epoch's evaluation, ``train.py --test-only``
and ``validation.py``. Under ``torch.distributed`` each process predicts its shard of the split and process 0
evaluates the gathered results."""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch
from pycocotools.coco import COCO
from tqdm import tqdm

from overlaps import MIN_OVERLAP_AREA
from train_utils import distributed
from train_utils.evaluation.coco_eval import evaluate_results
from train_utils.inference.detect import detect
from train_utils.masks import BoxMasks
from train_utils.outputs.predictions import outputs_to_coco_results


@torch.inference_mode()
def iter_predictions(
    model: torch.nn.Module,
    data_loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    mask_threshold: float = 0.5,
    show_progress: bool = False,
) -> Iterator[tuple[list[dict[str, torch.Tensor]], list[int]]]:
    """Per batch of this process's loader: ``(outputs of inference.detect on the CPU, floats in float32, masks at
    their box size; image ids)``."""
    model.eval()
    for images, targets in tqdm(data_loader, desc="eval", unit="img", disable=None if show_progress else True,
                                dynamic_ncols=True):
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = detect(model, images, mask_threshold)
        outputs = [{k: v.cpu() if isinstance(v, BoxMasks) else (v.float() if v.is_floating_point() else v).cpu()
                    for k, v in out.items()} for out in outputs]
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
    for outputs, ids in iter_predictions(model, data_loader, device, amp_dtype, mask_threshold, show_progress):
        results.extend(outputs_to_coco_results(outputs, ids, label_to_cat_id))
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
    """The evaluation record (``train_utils.evaluation.coco_eval.evaluate_results``) of ``model`` on the loader's
    images; every process returns the same record, equal to a one-process evaluation. ``label_names`` maps model
    labels to names. Pass the bare model, not its ``DistributedDataParallel`` wrapper."""
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
