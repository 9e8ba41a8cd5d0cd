"""Scores on crossing chromosomes, per crop, so that crops can be resampled (``evaluation.stats``).

The ground truth is a crop dataset of ``tools/crossing_crops.py``: each image has ``kind`` ("crossing" or "control")
and ``pairs`` (annotation id pairs that cross); each annotation has ``focus`` (the instances the crop is scored on).
Per crop, detections are matched one-to-one to all of its instances by ``metrics.match_detections`` (highest score
first, best mask IoU); instances out of focus act as crowd regions, as the overlap subsets of ``coco_eval`` do, so a
detection on one of them counts for nothing. From the matches:

* ``AP`` / ``AP75``: COCO's mask AP over the focus instances (IoU 0.50:0.05:0.95, 101 recall points, at most 100
  detections per crop, all scores);
* ``recall50`` / ``recall75``: focus instances found by a detection scoring at least ``score_thresh``, at mask IoU
  0.5 / 0.75; ``mean_iou``: their mean mask IoU at the 0.5 match;
* ``pairs50`` / ``pairs75``: the fraction of crossing pairs whose *both* chromosomes are found at IoU 0.5 / 0.75.

``classifier_agreement`` says how often DaCSeg's overlap classifier is right on the found chromosomes, crossing or
not, and ``crossing_errors`` where the masks of found crossing chromosomes go wrong (why a model separates pairs or
fails to).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO

from train_utils.evaluation.metrics import match_detections, pairwise_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100
METRICS = ("AP", "AP75", "recall50", "recall75", "mean_iou", "pairs50", "pairs75")


@dataclass
class CropScore:
    """The matches of one crop (one category): what every metric of a set of crops is computed from."""

    image_id: int
    kind: str
    category_id: int
    num_focus: int  # focus instances (the AP's denominator)
    scores: np.ndarray  # [D] scores of its detections, highest first (at most MAX_DETECTIONS)
    true: np.ndarray  # [T, D] bool: the detection matches a focus instance at IOU_THRESHOLDS[t]
    ignored: np.ndarray  # [T, D] bool: the detection lies on an instance out of focus
    found50: np.ndarray  # [G] bool per focus instance: matched at IoU 0.5 by a detection >= score_thresh
    found75: np.ndarray  # [G] bool, at IoU 0.75
    ious50: np.ndarray  # [G] mask IoU of each focus instance's 0.5 match (0 when unmatched)
    pairs: np.ndarray  # [P, 2] indices into the focus instances


def crop_scores(coco_gt: COCO, detections: Iterable[Mapping[str, Any]], score_thresh: float = 0.5,
                image_ids: Sequence[int] | None = None) -> list[CropScore]:
    """One ``CropScore`` per crop and category with focus instances (detections are COCO results with masks)."""
    dets_by_key: dict[tuple[int, int], list[Mapping[str, Any]]] = defaultdict(list)
    for d in detections:
        dets_by_key[d["image_id"], d["category_id"]].append(d)
    out = []
    for image_id in sorted(coco_gt.getImgIds() if image_ids is None else image_ids):
        info = coco_gt.imgs[image_id]
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        for category_id in sorted({a["category_id"] for a in anns if a.get("focus", True)}):
            gts = [a for a in anns if a["category_id"] == category_id]
            dets = sorted(dets_by_key.get((image_id, category_id), []), key=lambda d: -d["score"])[:MAX_DETECTIONS]
            out.append(_score_crop(coco_gt, info, gts, dets, category_id, score_thresh))
    return out


def _score_crop(coco_gt: COCO, info: Mapping[str, Any], gts: Sequence[dict], dets: Sequence[Mapping[str, Any]],
                category_id: int, score_thresh: float) -> CropScore:
    focus = np.array([bool(g.get("focus", True)) for g in gts], dtype=bool)
    ious = pairwise_iou(coco_gt, list(dets), list(gts), "segm", list(~focus))
    true, ignored = [], []
    for t in IOU_THRESHOLDS:
        matched, on_crowd = match_detections(ious, ~focus, float(t))
        true.append((matched >= 0) & ~on_crowd)
        ignored.append(on_crowd)
    kept = np.array([d["score"] >= score_thresh for d in dets], dtype=bool)
    found = {}
    for t in (0.5, 0.75):
        matched, on_crowd = match_detections(ious[kept], ~focus, t)
        hit = np.zeros(len(gts), dtype=bool)
        hit[matched[(matched >= 0) & ~on_crowd]] = True
        found[t] = (hit, matched)
    ious50 = np.zeros(len(gts))
    matched50 = found[0.5][1]
    for d, g in enumerate(matched50):
        if g >= 0 and focus[g]:
            ious50[g] = ious[kept][d, g]
    position = {g["id"]: k for k, g in enumerate(a for a, f in zip(gts, focus) if f)}
    pairs = np.array([[position[a], position[b]] for a, b in info.get("pairs", [])
                      if a in position and b in position], dtype=np.int64).reshape(-1, 2)
    shape = (len(IOU_THRESHOLDS), len(dets))
    return CropScore(
        image_id=int(info["id"]), kind=str(info.get("kind", "crossing")), category_id=int(category_id),
        num_focus=int(focus.sum()), scores=np.array([d["score"] for d in dets], dtype=np.float64),
        true=np.array(true, dtype=bool).reshape(shape), ignored=np.array(ignored, dtype=bool).reshape(shape),
        found50=found[0.5][0][focus], found75=found[0.75][0][focus], ious50=ious50[focus], pairs=pairs)


def average_precision(crops: Sequence[CropScore]) -> np.ndarray:
    """COCO's interpolated AP at each of ``IOU_THRESHOLDS`` over ``crops`` (one category), -1 without focus
    instances."""
    num_focus = sum(c.num_focus for c in crops)
    if num_focus == 0:
        return np.full(len(IOU_THRESHOLDS), -1.0)
    scores = np.concatenate([c.scores for c in crops]) if crops else np.zeros(0)
    order = np.argsort(-scores, kind="mergesort")
    true = np.concatenate([c.true for c in crops], axis=1)[:, order]
    ignored = np.concatenate([c.ignored for c in crops], axis=1)[:, order]
    tp = np.cumsum(true & ~ignored, axis=1, dtype=np.float64)
    fp = np.cumsum(~true & ~ignored, axis=1, dtype=np.float64)
    ap = np.zeros(len(IOU_THRESHOLDS))
    for t in range(len(IOU_THRESHOLDS)):
        recall = tp[t] / num_focus
        precision = tp[t] / np.maximum(tp[t] + fp[t], np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at any higher recall
        index = np.searchsorted(recall, RECALL_POINTS, side="left")
        ap[t] = np.where(index < len(precision), precision[np.minimum(index, len(precision) - 1)], 0.0).mean() \
            if len(precision) else 0.0
    return ap


def summarize(crops: Sequence[CropScore]) -> dict[str, float]:
    """``METRICS`` over ``crops`` (AP averaged over categories with focus instances; NaN where a metric has nothing
    to count)."""
    by_category: dict[int, list[CropScore]] = defaultdict(list)
    for c in crops:
        by_category[c.category_id].append(c)
    aps = [average_precision(group) for group in by_category.values()]
    aps = [ap for ap in aps if ap[0] >= 0]
    found50 = np.concatenate([c.found50 for c in crops]) if crops else np.zeros(0, bool)
    found75 = np.concatenate([c.found75 for c in crops]) if crops else np.zeros(0, bool)
    ious = np.concatenate([c.ious50[c.found50] for c in crops]) if crops else np.zeros(0)
    both50 = np.concatenate([c.found50[c.pairs].all(axis=1) for c in crops]) if crops else np.zeros(0, bool)
    both75 = np.concatenate([c.found75[c.pairs].all(axis=1) for c in crops]) if crops else np.zeros(0, bool)
    nan = float("nan")
    return {
        "AP": float(np.mean([ap.mean() for ap in aps])) if aps else nan,
        "AP75": float(np.mean([ap[5] for ap in aps])) if aps else nan,
        "recall50": float(found50.mean()) if found50.size else nan,
        "recall75": float(found75.mean()) if found75.size else nan,
        "mean_iou": float(ious.mean()) if ious.size else nan,
        "pairs50": float(both50.mean()) if both50.size else nan,
        "pairs75": float(both75.mean()) if both75.size else nan,
    }


def summarize_by_kind(crops: Sequence[CropScore]) -> dict[str, dict[str, float]]:
    """``summarize`` of the crossing crops and of the control crops."""
    return {kind: summarize([c for c in crops if c.kind == kind]) for kind in ("crossing", "control")}


def classifier_agreement(coco_gt: COCO, detections: Iterable[Mapping[str, Any]], score_thresh: float = 0.5,
                         overlap_thresh: float = 0.5) -> dict[str, float]:
    """How often DaCSeg's overlap classifier is right, on the detections (scoring >= ``score_thresh``) that match an
    instance at mask IoU 0.5: ``crossing_acc`` over those on crossing instances (``overlapping`` in the ground
    truth; right when ``overlap_score >= overlap_thresh``), ``other_acc`` over the rest (right when below), with
    their counts and mean overlap scores. Every instance of every crop counts, focus or not. Detections without an
    ``overlap_score`` (a model without the classifier) give NaN."""
    dets_by_image: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for d in detections:
        dets_by_image[d["image_id"]].append(d)
    truth, said = [], []
    for image_id, dets in sorted(dets_by_image.items()):
        for det, gt, _ in focus_matches(coco_gt, image_id, dets, score_thresh, focus_only=False):
            if "overlap_score" in det:
                truth.append(bool(gt.get("overlapping", False)))
                said.append(float(det["overlap_score"]))
    truth_array, scores = np.array(truth, dtype=bool), np.array(said, dtype=np.float64)
    crossing, other = scores[truth_array], scores[~truth_array]
    nan = float("nan")
    return {
        "crossing_rois": int(crossing.size),
        "crossing_acc": float((crossing >= overlap_thresh).mean()) if crossing.size else nan,
        "crossing_mean_score": float(crossing.mean()) if crossing.size else nan,
        "other_rois": int(other.size),
        "other_acc": float((other < overlap_thresh).mean()) if other.size else nan,
        "other_mean_score": float(other.mean()) if other.size else nan,
    }


def focus_matches(coco_gt: COCO, image_id: int, detections: Iterable[Mapping[str, Any]], score_thresh: float = 0.5,
                  iou_thresh: float = 0.5, focus_only: bool = True) -> list[tuple[Mapping[str, Any], dict, float]]:
    """The crop's focus instances (every instance with ``focus_only`` False) that a detection (scoring >=
    ``score_thresh``) finds at mask IoU ``iou_thresh``, matched as ``crop_scores`` matches them: ``(detection,
    instance, mask IoU)`` in instance order."""
    anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
    out = []
    for category_id in sorted({a["category_id"] for a in anns}):
        gts = [a for a in anns if a["category_id"] == category_id]
        dets = sorted((d for d in detections if d["image_id"] == image_id and d["category_id"] == category_id
                       and d["score"] >= score_thresh), key=lambda d: -d["score"])[:MAX_DETECTIONS]
        crowd = np.array([focus_only and not g.get("focus", True) for g in gts], dtype=bool)
        ious = pairwise_iou(coco_gt, dets, gts, "segm", list(crowd))
        matched, on_crowd = match_detections(ious, crowd, iou_thresh)
        out += [(dets[d], gts[g], float(ious[d, g])) for d, g in enumerate(matched) if g >= 0 and not on_crowd[d]]
    return sorted(out, key=lambda m: m[1]["id"])


ERROR_PARTS = ("missed", "missed_crossing", "into_partner", "into_others", "into_background")


def crossing_errors(coco_gt: COCO, detections: Iterable[Mapping[str, Any]],
                    score_thresh: float = 0.5) -> dict[str, float]:
    """Where the masks of the found crossing chromosomes go wrong: for each focus instance of a crossing pair found
    at mask IoU 0.5 (``focus_matches``), with G its mask, P the union of the chromosomes it crosses, U every
    instance of the crop and m the detection's mask, the mean over instances of ``missed`` |G - m| / |G|,
    ``missed_crossing`` |G∩P - m| / |G∩P| (the crossing region), ``into_partner`` |m∩P - G| / |G| (the mask spilling
    into the arms it crosses), ``into_others`` |m∩U - G - P| / |G| and ``into_background`` |m - U| / |G|, with
    ``found`` their count (NaN when none)."""
    from pycocotools import mask as mask_utils  # noqa: PLC0415

    dets_by_image: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for d in detections:
        dets_by_image[d["image_id"]].append(d)
    parts = []
    for image_id in sorted(coco_gt.getImgIds()):
        info = coco_gt.imgs[image_id]
        partners: dict[int, list[int]] = defaultdict(list)
        for a, b in info.get("pairs", []):
            partners[a].append(b)
            partners[b].append(a)
        matches = [m for m in focus_matches(coco_gt, image_id, dets_by_image.get(image_id, []), score_thresh)
                   if m[1]["id"] in partners]
        if not matches:
            continue
        masks = {a["id"]: coco_gt.annToMask(a).astype(bool) for a in coco_gt.imgToAnns[image_id]}
        every = np.any(np.stack(list(masks.values())), axis=0)
        for det, gt, _ in matches:
            own, found = masks[gt["id"]], mask_utils.decode(det["segmentation"]).astype(bool)
            partner = np.any(np.stack([masks[p] for p in partners[gt["id"]]]), axis=0)
            crossing, area = own & partner, max(int(own.sum()), 1)
            parts.append([(own & ~found).sum() / area, (crossing & ~found).sum() / max(int(crossing.sum()), 1),
                          (found & partner & ~own).sum() / area, (found & every & ~own & ~partner).sum() / area,
                          (found & ~every).sum() / area])
    means = np.mean(parts, axis=0) if parts else np.full(len(ERROR_PARTS), np.nan)
    return {"found": len(parts), **{name: float(value) for name, value in zip(ERROR_PARTS, means)}}
