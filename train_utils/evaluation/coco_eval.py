"""COCO evaluation in memory (faster-coco-eval's C++ COCOeval on pycocotools' data, no temporary files) plus the
chromosome metrics: the full evaluation record.

``evaluate_results`` is shared by training (each epoch), ``validation.py`` (a checkpoint or any results file) and
anything else that has COCO results; ``train_utils.outputs.record.write_record`` writes what it returns.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from numbers import Real
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np
from faster_coco_eval import COCOeval_faster
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from overlaps import MIN_OVERLAP_AREA
from train_utils.evaluation import metrics

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet(fn, *args):
    """Call ``fn`` with pycocotools' prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def copy_coco(coco_gt: COCO) -> COCO:
    """A private copy: pycocotools writes into the annotations it evaluates (RLE masks, ignore flags)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(coco_gt.dataset)
    _quiet(coco.createIndex)
    return coco


def _fmt_ids(ids: Collection[int], limit: int = 10) -> str:
    ids = sorted(ids)
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(map(str, ids[:limit])) + more


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _checked_geometry(i: int, det: dict[str, Any], coco_gt: COCO) -> None:
    """Bring one detection's ``segmentation`` to compressed RLE at its image's size and make sure it has a
    ``bbox`` of 4 floats (from the mask when absent); ValueError naming the result otherwise."""
    where = f"result {i} (image {det['image_id']})"
    img = coco_gt.imgs[det["image_id"]]
    seg = det.get("segmentation")
    if isinstance(seg, Mapping) and isinstance(seg.get("counts"), (str, bytes)):
        size = seg.get("size")
        if not isinstance(size, (list, tuple)) or list(size) != [img["height"], img["width"]]:
            raise ValueError(f"{where}: mask size {size} is not the image size {[img['height'], img['width']]}")
        det["segmentation"] = {"size": [int(v) for v in size], "counts": seg["counts"]}
    elif seg is not None:  # polygons or uncompressed RLE
        try:
            det["segmentation"] = coco_gt.annToRLE(det)
        except Exception as exc:  # pycocotools raises assorted errors for malformed input
            raise ValueError(f"{where}: unreadable segmentation ({type(exc).__name__}: {exc})") from None
    if "bbox" not in det:
        det["bbox"] = mask_utils.toBbox(det["segmentation"]).tolist()
    box = det["bbox"]
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, Real) and math.isfinite(v) for v in box):
        raise ValueError(f"{where}: bbox {box!r} is not [x, y, width, height]")
    det["bbox"] = [float(v) for v in box]


def check_results(coco_gt: COCO, results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated copies of COCO results: every ``segmentation`` as compressed RLE at the image's size, a ``bbox``
    (xywh, from the mask when absent). Raises ValueError naming the bad entry, image ids or category ids."""
    if not isinstance(results, (list, tuple)):
        raise ValueError(f"COCO results must be a list of detections, got {type(results).__name__}")
    dets: list[dict[str, Any]] = []
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise ValueError(f"result {i} is a {type(r).__name__}, not a detection object")
        missing = [k for k in ("image_id", "category_id", "score") if k not in r]
        if "bbox" not in r and "segmentation" not in r:
            missing.append("bbox or segmentation")
        if missing:
            raise ValueError(f"result {i} (image {r.get('image_id')}) has no {', '.join(missing)}")
        for key in ("image_id", "category_id"):
            if not _is_int(r[key]):
                raise ValueError(f"result {i} has {key} {r[key]!r}; expected an integer")
        score = r["score"]
        if isinstance(score, bool) or not isinstance(score, Real) or not math.isfinite(score):
            raise ValueError(f"result {i} (image {r['image_id']}) has score {score!r}; expected a finite number")
        dets.append({"image_id": int(r["image_id"]), "category_id": int(r["category_id"]), "score": float(score),
                     **{k: r[k] for k in ("bbox", "segmentation") if k in r}})

    unknown_images = {d["image_id"] for d in dets} - set(coco_gt.getImgIds())
    if unknown_images:
        raise ValueError(f"results name image id(s) not in the ground truth: {_fmt_ids(unknown_images)}")
    unknown_cats = {d["category_id"] for d in dets} - set(coco_gt.getCatIds())
    if unknown_cats:
        raise ValueError(
            f"results name category id(s) not in the ground truth: {_fmt_ids(unknown_cats)} "
            f"(known: {_fmt_ids(coco_gt.getCatIds())})"
        )
    with_masks = sum("segmentation" in d for d in dets)
    if 0 < with_masks < len(dets):
        first = next(i for i, d in enumerate(dets) if "segmentation" not in d)
        raise ValueError(f"results mix detections with and without segmentation (result {first} has none)")
    for i, d in enumerate(dets):
        _checked_geometry(i, d, coco_gt)
    return dets


def _results_coco(coco_gt: COCO, dets: Sequence[dict[str, Any]], iou_type: str) -> COCO:
    """The detections as a results COCO for one IoU type, as ``COCO.loadRes`` makes it (box area for ``bbox``,
    mask area for ``segm``), also when there are none (``loadRes`` cannot take an empty list)."""
    keep = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    anns = [{k: d[k] for k in keep} for d in dets]
    if anns:
        return _quiet(coco_gt.loadRes, anns)
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])), "annotations": []}
    _quiet(coco_dt.createIndex)
    return coco_dt


def run_cocoeval(
    coco_gt: COCO,
    coco_dt: COCO,
    iou_type: str,
    image_ids: Sequence[int] | None = None,
    all_areas_only: bool = False,
) -> tuple[COCOeval_faster, list[str]]:
    """Evaluate, accumulate and summarise silently with faster-coco-eval (pycocotools' numbers, computed in C++);
    returns the evaluator and the 12 summary lines pycocotools prints.

    ``all_areas_only`` skips the small / medium / large ranges (4x less work; their stats are then -1).
    """
    printed: list[str] = []
    evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=printed.append)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    if all_areas_only:
        evaluator.params.areaRng, evaluator.params.areaRngLbl = evaluator.params.areaRng[:1], ["all"]
    evaluator.evaluate()
    evaluator.accumulate()
    printed.clear()
    evaluator.summarize()
    stats = [float(s) for s in evaluator.stats[:len(STAT_NAMES)]]
    if all_areas_only:  # the summary of one area range has no small / medium / large entries
        stats = stats[:3] + [-1.0] * 3 + stats[3:6] + [-1.0] * 3
    evaluator.stats = np.array(stats)
    return evaluator, [line.rstrip() for line in printed if line.lstrip().startswith("Average")][:len(STAT_NAMES)]


@contextlib.contextmanager
def _as_crowd(coco_gt: COCO, ann_ids: Collection[int]) -> Iterator[None]:
    """Treat the annotations ``ann_ids`` of ``coco_gt`` (a private copy) as crowd regions for a while.

    COCO evaluation then ignores any detection lying on one (intersection over the detection's own area >= the IoU
    threshold), however many, and never counts them as missed: this scores a subset of the ground truth with
    duplicates and fragments on the other instances left out of its numbers. Detections on no instance at all remain
    false positives.
    """
    changed = [(a, a.get("iscrowd", 0)) for a in (coco_gt.anns[i] for i in ann_ids)]
    for ann, _ in changed:
        ann["iscrowd"] = 1
    try:
        yield
    finally:
        for ann, crowd in changed:
            ann["iscrowd"] = crowd


def per_class_ap50(evaluator: COCOeval_faster, names: Mapping[int, str]) -> dict[str, float]:
    """Category name -> AP at IoU 0.5 (all areas, 100 detections); -1 for a category without ground truth."""
    precision = evaluator.eval["precision"]  # [IoU, recall, category, area, max dets]
    iou50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[iou50, :, k, 0, -1]
        out[names[cat_id]] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return out


def _category_names(coco_gt: COCO, label_names: Mapping[int, str] | None) -> dict[int, str]:
    names = {cat_id: str(cat.get("name", cat_id)) for cat_id, cat in coco_gt.cats.items()}
    names.update({int(k): str(v) for k, v in (label_names or {}).items() if int(k) in names})
    if len(set(names.values())) < len(names):  # keep per-class keys distinct
        names = {cat_id: f"{name} ({cat_id})" for cat_id, name in names.items()}
    return names


def evaluate_results(
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    score_thresh: float = 0.5,
    label_names: Mapping[int, str] | None = None,
    image_ids: Sequence[int] | None = None,
    min_overlap_area: float = MIN_OVERLAP_AREA,
) -> dict[str, Any]:
    """The full evaluation record of COCO ``results`` against ``coco_gt`` (left unchanged).

    ``bbox`` and ``segm`` (``segm`` only when the results carry masks, or when there are none; else None): the 12
    COCOeval stats, each by name, ``per_class_AP50`` and the printed ``summary_lines``, and one-to-one
    ``precision``/``recall``/``f1`` at IoU 0.5 of detections with ``score >= score_thresh`` (also at the top level,
    mask-based). ``overlap_segm`` / ``non_overlap_segm``: segm AP, AP50, AP75, precision, recall, f1 and
    ``num_instances`` over the ground truth that does / does not overlap another instance; detections lying on the
    other instances are ignored (see ``_as_crowd``).
    ``count_mae``, ``count_exact``, ``count_bias``: per-image instance count error.

    ``label_names`` (COCO category id -> name) overrides the ground-truth category names; ``image_ids`` restricts
    the evaluation to those images (default: all). Raises ValueError for results that do not fit the ground truth.
    """
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score threshold must be in [0, 1], got {score_thresh}")
    gt = copy_coco(coco_gt)
    dets = check_results(gt, results)
    image_ids = _evaluated_images(gt, dets, image_ids)
    gt_anns = metrics.annotations_of(gt, image_ids)
    iou_types = ["bbox", "segm"] if not dets or "segmentation" in dets[0] else ["bbox"]
    record: dict[str, Any] = {
        "score_thresh": float(score_thresh),
        "match_iou": metrics.MATCH_IOU,
        "iou_types": iou_types,
        "num_images": len(image_ids),
        "num_gt": sum(not a.get("iscrowd", 0) for a in gt_anns),
        "num_detections": len(dets),
        "num_detections_at_thresh": sum(d["score"] >= score_thresh for d in dets),
    }
    names = _category_names(gt, label_names)
    for iou_type in IOU_TYPES:
        record[iou_type] = _coco_section(gt, dets, iou_type, image_ids, score_thresh, names) \
            if iou_type in iou_types else None
    if record["segm"] is not None:
        record.update({k: record["segm"][k] for k in ("precision", "recall", "f1")})
        record.update(_overlap_subsets(gt, dets, gt_anns, image_ids, score_thresh, min_overlap_area))
    else:
        record.update({"precision": None, "recall": None, "f1": None, "overlap_segm": None, "non_overlap_segm": None})
    record.update(metrics.count_errors(gt, dets, score_thresh, image_ids))
    return record


def _evaluated_images(gt: COCO, dets: Sequence[dict[str, Any]], image_ids: Sequence[int] | None) -> list[int]:
    """The image ids to evaluate (default: all of ``gt``); ValueError when they or the detections do not fit."""
    if image_ids is None:
        return sorted(gt.getImgIds())
    image_ids = sorted(set(image_ids))
    missing = set(image_ids) - set(gt.getImgIds())
    if missing:
        raise ValueError(f"image id(s) not in the ground truth: {_fmt_ids(missing)}")
    outside = {d["image_id"] for d in dets} - set(image_ids)
    if outside:
        raise ValueError(f"results name image id(s) outside the evaluated images: {_fmt_ids(outside)}")
    return image_ids


def _coco_section(gt: COCO, dets: Sequence[dict[str, Any]], iou_type: str, image_ids: Sequence[int],
                  score_thresh: float, names: Mapping[int, str]) -> dict[str, Any]:
    """One IoU type's part of the record: the 12 stats by name, per-class AP50, the summary lines, P / R / F1."""
    evaluator, lines = run_cocoeval(gt, _results_coco(gt, dets, iou_type), iou_type, image_ids)
    stats = [float(s) for s in evaluator.stats]
    return {
        "stats": stats,
        **dict(zip(STAT_NAMES, stats)),
        "per_class_AP50": per_class_ap50(evaluator, names),
        "summary_lines": lines,
        **metrics.detection_prf(gt, dets, iou_type, score_thresh, image_ids=image_ids),
    }


def _overlap_subsets(gt: COCO, dets: Sequence[dict[str, Any]], gt_anns: Sequence[dict[str, Any]],
                     image_ids: Sequence[int], score_thresh: float, min_overlap_area: float) -> dict[str, Any]:
    """``overlap_segm`` and ``non_overlap_segm``: segm AP / AP50 / AP75, P / R / F1 and the instance count over the
    ground truth that does / does not overlap another (``overlaps``), the other instances as crowd regions."""
    overlapping = metrics.overlapping_flags(gt, min_overlap_area)
    coco_dt = _results_coco(gt, dets, "segm")
    subsets = {}
    for key, in_subset in (("overlap_segm", True), ("non_overlap_segm", False)):
        ignored = {a["id"] for a in gt_anns if overlapping.get(a["id"], False) != in_subset}
        with _as_crowd(gt, ignored):
            evaluator, _ = run_cocoeval(gt, coco_dt, "segm", image_ids, all_areas_only=True)
        subsets[key] = {
            **dict(zip(("AP", "AP50", "AP75"), (float(s) for s in evaluator.stats[:3]))),
            **metrics.detection_prf(gt, dets, "segm", score_thresh, image_ids=image_ids, ignore_ann_ids=ignored),
            "num_instances": sum(overlapping.get(a["id"], not in_subset) == in_subset for a in gt_anns),
        }
    return subsets
