"""Chromosome-level metrics beyond COCO AP: one-to-one precision / recall / F1, the overlapping-instance flag, count error.

Detections are COCO result dicts with ``bbox`` (xywh) and, for masks, ``segmentation`` as compressed RLE; ground truth
is a pycocotools ``COCO``. Crowd ground truth (``iscrowd: 1``) is treated as COCO treats it: a region that swallows any
detection matching it and is never missed.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Collection, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from overlaps import MIN_OVERLAP_AREA, instance_flags

MATCH_IOU = 0.5


def match_detections(
    ious: np.ndarray, gt_crowd: np.ndarray, iou_thresh: float = MATCH_IOU
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of detections (rows of ``ious``, highest score first) to ground truth (columns).

    Each detection in turn takes the free, non-crowd ground truth it overlaps most at IoU >= ``iou_thresh``; failing
    that, the crowd region it overlaps most (never used up), which makes the detection ignored: neither a true nor a
    false positive. Returns ``(matched ground-truth index or -1 per detection, ignored per detection)``.
    """
    num_dt, num_gt = ious.shape
    matched = np.full(num_dt, -1, dtype=np.int64)
    ignored = np.zeros(num_dt, dtype=bool)
    taken = np.zeros(num_gt, dtype=bool)
    for d in range(num_dt):
        hits = ious[d] >= iou_thresh
        for crowd in (False, True):
            free = hits & (gt_crowd == crowd) & ~taken
            if free.any():
                g = int(np.argmax(np.where(free, ious[d], -1.0)))
                matched[d], ignored[d] = g, crowd
                taken[g] = not crowd
                break
    return matched, ignored


def annotations_of(coco_gt: COCO, image_ids: Iterable[int]) -> list[dict[str, Any]]:
    """The ground-truth annotations of ``image_ids`` (none for no images: ``getAnnIds(imgIds=[])`` means all)."""
    return [a for i in sorted(image_ids) for a in coco_gt.imgToAnns.get(i, [])]


def precision_recall_f1(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2PR/(P+R); each 0 where its denominator is 0."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _regions(coco_gt: COCO, anns: Sequence[dict[str, Any]], iou_type: str) -> Any:
    """What ``pycocotools.mask.iou`` compares: RLEs for ``segm``, an ``[N, 4]`` xywh array for ``bbox``."""
    if iou_type == "segm":
        return [coco_gt.annToRLE(a) for a in anns]
    return np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)


def pairwise_iou(
    coco_gt: COCO, dets: Sequence[dict[str, Any]], gts: Sequence[dict[str, Any]], iou_type: str,
    crowd: Sequence[bool] | None = None,
) -> np.ndarray:
    """``[len(dets), len(gts)]`` IoU: mask IoU for ``segm``, box IoU for ``bbox``. For crowd ground truth (default:
    its ``iscrowd``) the intersection is divided by the detection's own area, as COCO does."""
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    if crowd is None:
        crowd = [bool(g.get("iscrowd", 0)) for g in gts]
    return np.asarray(mask_utils.iou(_regions(coco_gt, dets, iou_type), _regions(coco_gt, gts, iou_type),
                                     [int(c) for c in crowd]))


def detection_prf(
    coco_gt: COCO,
    detections: Iterable[dict[str, Any]],
    iou_type: str = "segm",
    score_thresh: float = 0.5,
    iou_thresh: float = MATCH_IOU,
    image_ids: Collection[int] | None = None,
    ignore_ann_ids: Collection[int] = (),
) -> dict[str, float | int]:
    """Precision, recall and F1 (plus TP/FP/FN) of the detections with ``score >= score_thresh``.

    Per image and category, detections are matched one-to-one to ground truth by ``match_detections``. Ground truth
    in ``ignore_ann_ids`` is treated like a crowd region: any detection lying on it (intersection over the
    detection's area >= ``iou_thresh``) counts for nothing and it is never a miss, which restricts the numbers to a
    subset of instances (see ``overlapping_flags``) as ``coco_eval`` does for the subset AP.
    """
    image_ids = set(coco_gt.getImgIds() if image_ids is None else image_ids)
    ignore_ann_ids = set(ignore_ann_ids)
    dets_by_key: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for d in detections:
        if d["score"] >= score_thresh and d["image_id"] in image_ids:
            dets_by_key[d["image_id"], d["category_id"]].append(d)
    gts_by_key: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for a in annotations_of(coco_gt, image_ids):
        gts_by_key[a["image_id"], a["category_id"]].append(a)

    tp = fp = fn = 0
    for key in set(dets_by_key) | set(gts_by_key):
        dets = sorted(dets_by_key.get(key, []), key=lambda d: -d["score"])
        gts = gts_by_key.get(key, [])
        crowd = np.array([bool(g.get("iscrowd", 0)) or g["id"] in ignore_ann_ids for g in gts], dtype=bool)
        ious = pairwise_iou(coco_gt, dets, gts, iou_type, crowd)
        matched, ignored = match_detections(ious, crowd, iou_thresh)
        hits = int(((matched >= 0) & ~ignored).sum())
        tp += hits
        fp += int((matched < 0).sum())
        fn += int((~crowd).sum()) - hits
    return precision_recall_f1(tp, fp, fn)


def overlapping_flags(coco_gt: COCO, min_overlap_area: float = MIN_OVERLAP_AREA) -> dict[int, bool]:
    """Annotation id -> whether the instance overlaps another one, for every non-crowd annotation, by the rule of
    ``overlaps.instance_flags`` (the annotation's own flag, else derived from the masks), as the dataset gives it."""
    flags: dict[int, bool] = {}
    for image_id in coco_gt.getImgIds():
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        given = [a.get("overlapping") for a in anns]
        rles = [coco_gt.annToRLE(a) for a in anns] if None in given else []
        flags.update(zip((a["id"] for a in anns), instance_flags(given, rles, min_overlap_area)))
    return flags


def count_errors(
    coco_gt: COCO, detections: Iterable[dict[str, Any]], score_thresh: float = 0.5, image_ids: Collection[int] | None = None
) -> dict[str, float]:
    """Per image, detections with ``score >= score_thresh`` minus non-crowd ground-truth instances (all classes).

    ``count_mae``: mean absolute difference; ``count_exact``: fraction of images counted exactly; ``count_bias``: mean
    signed difference (> 0: over-counting). All 0 when there are no images.
    """
    image_ids = sorted(coco_gt.getImgIds() if image_ids is None else image_ids)
    predicted = dict.fromkeys(image_ids, 0)
    for d in detections:
        if d["score"] >= score_thresh and d["image_id"] in predicted:
            predicted[d["image_id"]] += 1
    diff = np.array(
        [predicted[i] - sum(not a.get("iscrowd", 0) for a in coco_gt.imgToAnns.get(i, [])) for i in image_ids], dtype=float
    )
    if diff.size == 0:
        return {"count_mae": 0.0, "count_exact": 0.0, "count_bias": 0.0}
    return {
        "count_mae": float(np.abs(diff).mean()),
        "count_exact": float((diff == 0).mean()),
        "count_bias": float(diff.mean()),
    }
