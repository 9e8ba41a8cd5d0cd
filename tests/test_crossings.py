"""train_utils/evaluation/crossings.py: per-crop scores on crossing chromosomes, "pairs separated", COCO's AP."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tests.conftest import bar_polygon
from tools.coco_layout import rle_from_mask
from train_utils.evaluation.coco_eval import evaluate_results
from train_utils.evaluation.crossings import (
    classifier_agreement, crop_scores, crossing_errors, focus_matches, summarize, summarize_by_kind)

H = W = 100


def bar(angle: float, cx: float = 50, cy: float = 50, length: float = 70) -> np.ndarray:
    return mask_utils.decode(mask_utils.frPyObjects([bar_polygon(cx, cy, length, 10, angle)], H, W))[..., 0]


def crops_coco(crops: list[list[tuple[np.ndarray, bool]]], kinds: list[str]) -> COCO:
    """Crops of (mask, focus) instances; the focus instances of a crossing crop form one crossing pair each two."""
    images, anns = [], []
    for image_id, (instances, kind) in enumerate(zip(crops, kinds), start=1):
        ids = []
        for mask, focus in instances:
            rle = rle_from_mask(mask)
            ann_id = len(anns) + 1
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": rle, "iscrowd": 0,
                         "area": float(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                         "focus": focus})
            ids.append(ann_id) if focus else None
        pairs = [ids[k:k + 2] for k in range(0, len(ids) - 1, 2)] if kind == "crossing" else []
        images.append({"id": image_id, "width": W, "height": H, "file_name": f"{image_id}.png", "kind": kind,
                       "pairs": pairs})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "chr"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def det(image_id: int, mask: np.ndarray, score: float) -> dict:
    rle = rle_from_mask(mask)
    return {"image_id": image_id, "category_id": 1, "segmentation": rle, "score": score,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)]}


def x_crop():
    return [(bar(35), True), (bar(145), True), (bar(90, cx=90, cy=50, length=30), False)]


def test_a_perfect_prediction_separates_every_pair():
    coco = crops_coco([x_crop(), x_crop()], ["crossing", "crossing"])
    dets = [det(i, m, 0.9) for i in (1, 2) for m, _ in x_crop()]
    got = summarize(crop_scores(coco, dets))
    assert got["pairs75"] == got["pairs50"] == 1.0
    assert got["AP"] == pytest.approx(1.0) and got["recall75"] == 1.0 and got["mean_iou"] == pytest.approx(1.0)


def test_one_arm_missing_loses_its_pair():
    coco = crops_coco([x_crop(), x_crop()], ["crossing", "crossing"])
    first, second, _ = (m for m, _ in x_crop())
    dets = [det(1, first, 0.9), det(1, second, 0.8), det(2, first, 0.9)]  # crop 2 misses its second arm
    got = summarize(crop_scores(coco, dets))
    assert got["pairs50"] == got["pairs75"] == 0.5
    assert got["recall50"] == 0.75


def test_an_arm_found_only_roughly_separates_at_0_5_but_not_at_0_75():
    coco = crops_coco([x_crop()], ["crossing"])
    first, second, _ = (m for m, _ in x_crop())
    rough = second.copy()
    rough[:, :45] = 0  # about 60 % of the arm
    got = summarize(crop_scores(coco, [det(1, first, 0.9), det(1, rough, 0.9)]))
    assert (got["pairs50"], got["pairs75"]) == (1.0, 0.0)


def test_detections_below_the_score_threshold_find_nothing_but_count_for_ap():
    coco = crops_coco([x_crop()], ["crossing"])
    dets = [det(1, m, 0.3) for m, _ in x_crop()[:2]]
    got = summarize(crop_scores(coco, dets, score_thresh=0.5))
    assert got["pairs50"] == 0.0 and got["recall50"] == 0.0 and got["AP"] == pytest.approx(1.0)


def test_instances_out_of_focus_neither_count_nor_punish():
    coco = crops_coco([x_crop()], ["crossing"])
    _, _, lone = (m for m, _ in x_crop())
    got = summarize(crop_scores(coco, [det(1, lone, 0.99)]))  # only the out-of-focus bar is found
    assert got["recall50"] == 0.0
    scores = crop_scores(coco, [det(1, lone, 0.99)])
    assert scores[0].ignored[:, 0].all() and not scores[0].true.any()


def test_kinds_are_scored_apart():
    control = [(bar(0, cx=50, cy=30, length=50), True), (bar(0, cx=50, cy=70, length=50), True)]
    coco = crops_coco([x_crop(), control], ["crossing", "control"])
    dets = [det(2, m, 0.9) for m, _ in control]
    got = summarize_by_kind(crop_scores(coco, dets))
    assert got["control"]["recall75"] == 1.0 and got["crossing"]["recall75"] == 0.0
    assert np.isnan(got["control"]["pairs75"])


def test_ap_equals_coco_eval_on_the_focus_instances():
    rng = np.random.default_rng(0)
    crops = [x_crop() for _ in range(4)]
    coco = crops_coco(crops, ["crossing"] * 4)
    dets = []
    for image_id, crop in enumerate(crops, start=1):
        for mask, _ in crop:
            noisy = mask.copy()
            noisy[:, : int(rng.integers(0, 30))] = 0
            dets.append(det(image_id, noisy, float(rng.uniform(0.1, 1.0))))
        dets.append(det(image_id, bar(60, cx=20, cy=80, length=30), float(rng.uniform(0.1, 1.0))))  # a false one
    ours = summarize(crop_scores(coco, dets))
    for a in coco.dataset["annotations"]:
        a["overlapping"] = a["focus"]  # coco_eval's overlap subset is then exactly the focus instances
    record = evaluate_results(coco, dets)
    assert ours["AP"] == pytest.approx(record["overlap_segm"]["AP"], abs=1e-9)
    assert ours["AP75"] == pytest.approx(record["overlap_segm"]["AP75"], abs=1e-9)


def flagged_coco(instances: list[tuple[np.ndarray, bool]]) -> COCO:
    """One crossing crop whose instances carry the ground truth's ``overlapping`` flag."""
    coco = crops_coco([[(mask, True) for mask, _ in instances]], ["crossing"])
    for ann, (_, overlapping) in zip(coco.dataset["annotations"], instances):
        ann["overlapping"] = overlapping
    return coco


def test_classifier_agreement_counts_right_and_wrong_flags_on_matched_detections():
    first, second, lone = (m for m, _ in x_crop())
    coco = flagged_coco([(first, True), (second, True), (lone, False)])
    dets = [dict(det(1, first, 0.9), overlap_score=0.8),  # crossing, said crossing: right
            dict(det(1, second, 0.9), overlap_score=0.3),  # crossing, said not: wrong
            dict(det(1, lone, 0.9), overlap_score=0.1),  # lone, said not: right
            dict(det(1, lone, 0.4), overlap_score=0.9)]  # below the score threshold: not counted
    got = classifier_agreement(coco, dets)
    assert (got["crossing_rois"], got["other_rois"]) == (2, 1)
    assert got["crossing_acc"] == 0.5 and got["other_acc"] == 1.0
    assert got["crossing_mean_score"] == pytest.approx(0.55)


def test_classifier_agreement_without_overlap_scores_is_nan():
    first, second, lone = (m for m, _ in x_crop())
    coco = flagged_coco([(first, True), (second, True), (lone, False)])
    got = classifier_agreement(coco, [det(1, first, 0.9), det(1, lone, 0.9)])
    assert got["crossing_rois"] == got["other_rois"] == 0
    assert np.isnan(got["crossing_acc"]) and np.isnan(got["other_acc"])


def test_focus_matches_pairs_each_found_focus_instance_with_its_detection():
    first, second, lone = (m for m, _ in x_crop())
    coco = crops_coco([x_crop()], ["crossing"])  # the lone bar is out of focus
    rough = second.copy()
    rough[:, :45] = 0
    dets = [det(1, first, 0.9), det(1, rough, 0.8), det(1, lone, 0.9), det(1, first, 0.3)]
    got = focus_matches(coco, 1, dets)
    assert [g["id"] for _, g, _ in got] == [1, 2]  # not the lone bar (out of focus), not the 0.3 duplicate
    assert got[0][0]["score"] == 0.9 and got[0][2] == pytest.approx(1.0)
    assert 0.5 <= got[1][2] < 0.75
    assert focus_matches(coco, 1, dets, iou_thresh=0.75) == got[:1]


def test_crossing_errors_split_a_mask_that_spills_into_the_arm_it_crosses():
    first, second, lone = (m for m, _ in x_crop())  # the crossing pair is (first, second); the lone bar is no partner
    coco = crops_coco([x_crop()], ["crossing"])
    spill = second & ~first
    spill[:, :50] = False  # half of the partner's free part
    missing = first.copy()
    missing[:, 65:] = False  # the end of the first arm, away from the crossing
    dets = [det(1, missing | spill, 0.9), det(1, second, 0.9)]
    got = crossing_errors(coco, dets)
    assert got["found"] == 2
    area = first.sum()
    expected_missed = (first & ~missing).sum() / area / 2  # the second arm is perfect
    assert got["missed"] == pytest.approx(expected_missed)
    assert got["missed_crossing"] == 0.0  # the crossing region is kept
    assert got["into_partner"] == pytest.approx(spill.sum() / area / 2)
    assert got["into_others"] == got["into_background"] == 0.0


def test_crossing_errors_count_only_crossing_chromosomes():
    coco = crops_coco([x_crop()], ["control"])  # no pairs
    got = crossing_errors(coco, [det(1, m, 0.9) for m, _ in x_crop()])
    assert got["found"] == 0 and np.isnan(got["missed"])
