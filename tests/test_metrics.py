from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from train_utils.evaluation import metrics

H = W = 64


def rect_rle(x: int, y: int, w: int, h: int, size: tuple[int, int] = (H, W)) -> dict:
    mask = np.zeros(size, dtype=np.uint8)
    mask[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_coco(boxes_per_image: dict[int, list[tuple]], flags: dict[int, bool] | None = None) -> COCO:
    """Rectangles as ground truth: ``{image_id: [(x, y, w, h) or (x, y, w, h, category_id), ...]}``."""
    images = [{"id": i, "width": W, "height": H, "file_name": f"{i}.png"} for i in boxes_per_image]
    anns = []
    for image_id, boxes in boxes_per_image.items():
        for box in boxes:
            x, y, w, h, *cat = box
            ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": cat[0] if cat else 1, "iscrowd": 0,
                   "bbox": [x, y, w, h], "area": w * h, "segmentation": rect_rle(x, y, w, h)}
            if flags is not None and ann["id"] in flags:
                ann["overlapping"] = flags[ann["id"]]
            anns.append(ann)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": 1, "name": "chromosome"}, {"id": 2, "name": "nucleus"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def det(image_id: int, x: int, y: int, w: int, h: int, score: float, category_id: int = 1) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h], "score": score,
            "segmentation": rect_rle(x, y, w, h)}


A, B, C = (5, 5, 20, 20), (35, 5, 20, 20), (5, 35, 20, 20)


def test_precision_recall_f1_zero_denominators():
    assert metrics.precision_recall_f1(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}
    assert metrics.precision_recall_f1(0, 3, 0)["precision"] == 0.0
    out = metrics.precision_recall_f1(3, 1, 3)
    assert out["precision"] == pytest.approx(0.75) and out["recall"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)


def test_match_is_greedy_highest_score_first():
    # det 0 (higher score) takes gt 0 although det 1 fits it better; det 1 then has nothing left at IoU >= 0.5
    ious = np.array([[0.6, 0.55], [0.9, 0.0]])
    matched, ignored = metrics.match_detections(ious, np.zeros(2, bool))
    assert matched.tolist() == [0, -1] and not ignored.any()


def test_match_prefers_regular_ground_truth_and_crowds_take_any_number():
    ious = np.array([[0.9, 0.6, 0.0], [0.9, 0.0, 0.0], [0.0, 0.0, 0.7], [0.0, 0.0, 0.8], [0.0, 0.4, 0.0]])
    crowd = np.array([True, False, True])
    matched, ignored = metrics.match_detections(ious, crowd)
    # det 0 matches the regular gt 1 even though crowd 0 overlaps more (as pycocotools does)
    assert matched.tolist() == [1, 0, 2, 2, -1]
    assert ignored.tolist() == [False, True, True, True, False]
    # IoU exactly at the threshold matches
    assert metrics.match_detections(np.array([[0.5]]), np.zeros(1, bool))[0].tolist() == [0]


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_hand_computed_duplicate_low_score_and_miss(iou_type):
    coco = make_coco({1: [A, B, C]})
    dets = [det(1, *A, 0.9),          # TP
            det(1, 6, 6, 20, 20, 0.8),  # duplicate of A (IoU 0.82): FP
            det(1, *B, 0.3)]          # below the threshold: not counted, so B is a miss; C is a miss too
    out = metrics.detection_prf(coco, dets, iou_type, score_thresh=0.5)
    assert (out["tp"], out["fp"], out["fn"]) == (1, 1, 2)
    assert out["precision"] == pytest.approx(1 / 2)
    assert out["recall"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    low = metrics.detection_prf(coco, dets, iou_type, score_thresh=0.3)  # score >= threshold counts
    assert (low["tp"], low["fp"], low["fn"]) == (2, 1, 1)


def test_mask_and_box_iou_differ_and_category_must_agree():
    coco = make_coco({1: [A]})
    # an L-shaped mask inside A's box: box IoU 1, mask IoU 0.36
    mask = np.zeros((H, W), np.uint8)
    mask[5:25, 5:9] = 1
    mask[21:25, 5:25] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    l_shape = {"image_id": 1, "category_id": 1, "bbox": list(A), "score": 0.9, "segmentation": rle}
    assert metrics.detection_prf(coco, [l_shape], "bbox")["tp"] == 1
    assert metrics.detection_prf(coco, [l_shape], "segm")["tp"] == 0
    wrong_class = det(1, *A, 0.9, category_id=2)
    out = metrics.detection_prf(coco, [wrong_class], "segm")
    assert (out["tp"], out["fp"], out["fn"]) == (0, 1, 1)


def test_ground_truth_as_detections_is_perfect_and_crowd_is_ignored():
    coco = make_coco({1: [A, B], 2: [C]})
    dets = [det(a["image_id"], *a["bbox"], 1.0) for a in coco.dataset["annotations"]]
    assert metrics.detection_prf(coco, dets, "segm") == {"precision": 1.0, "recall": 1.0, "f1": 1.0,
                                                         "tp": 3, "fp": 0, "fn": 0}
    coco.anns[3]["iscrowd"] = 1  # C becomes a crowd region: neither missed nor matched
    out = metrics.detection_prf(coco, dets + [det(2, 6, 36, 10, 10, 0.9)], "segm")
    assert (out["tp"], out["fp"], out["fn"]) == (2, 0, 0)


def test_ignored_subset_leaves_precision_unchanged():
    coco = make_coco({1: [A, B, C]})
    ignore = {2, 3}  # keep only A
    base = [det(1, *A, 0.9), det(1, 40, 40, 10, 10, 0.8)]  # a TP and a background FP
    before = metrics.detection_prf(coco, base, ignore_ann_ids=ignore)
    after = metrics.detection_prf(coco, base + [det(1, *B, 0.95)], ignore_ann_ids=ignore)
    assert before == after == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "tp": 1, "fp": 1, "fn": 0}
    # duplicates and fragments lying on an ignored instance are ignored too (it acts as a crowd region) ...
    on_b = [det(1, *B, 0.95), det(1, 36, 6, 20, 20, 0.94), det(1, 40, 10, 5, 5, 0.93)]
    assert metrics.detection_prf(coco, base + on_b, ignore_ann_ids=ignore) == before
    # ... but without the ignore they are false positives (one-to-one matching)
    assert metrics.detection_prf(coco, base + on_b)["fp"] == 3


def test_no_images_means_no_ground_truth():
    # pycocotools' getAnnIds(imgIds=[]) returns every annotation; evaluating no image must count none
    coco = make_coco({1: [A, B], 2: [A]})
    assert metrics.annotations_of(coco, []) == []
    assert [a["id"] for a in metrics.annotations_of(coco, [2])] == [3]
    assert metrics.detection_prf(coco, [], image_ids=[])["fn"] == 0
    assert metrics.detection_prf(coco, [], image_ids=[2])["fn"] == 1


def test_overlapping_flags_from_annotation_or_masks():
    # two rectangles sharing a 5x4 = 20 px strip, two touching along a 10 px column, one alone
    coco = make_coco({1: [(0, 0, 10, 10), (5, 6, 10, 10), (30, 30, 10, 10), (39, 30, 10, 10)], 2: [(0, 0, 19, 19)]})
    # (30..39) and (39..48) share column 39 only: 10 px
    flags = metrics.overlapping_flags(coco)
    assert flags == {1: True, 2: True, 3: False, 4: False, 5: False}
    assert metrics.overlapping_flags(coco, min_overlap_area=21) == {1: False, 2: False, 3: False, 4: False, 5: False}
    flagged = make_coco({1: [(0, 0, 10, 10), (30, 30, 10, 10)]}, flags={1: True, 2: False})
    assert metrics.overlapping_flags(flagged) == {1: True, 2: False}  # the annotation's flag wins


def test_count_errors():
    coco = make_coco({1: [A, B, C], 2: [A], 3: []})
    dets = [det(1, *A, 0.9), det(1, *B, 0.9), det(1, *C, 0.2),  # image 1: 2 counted vs 3
            det(2, *A, 0.9),                                     # image 2: exact
            det(3, *A, 0.6), det(3, *B, 0.5)]                    # image 3 (no ground truth): 2 vs 0
    out = metrics.count_errors(coco, dets, score_thresh=0.5)
    assert out == {"count_mae": pytest.approx(1.0), "count_exact": pytest.approx(1 / 3), "count_bias": pytest.approx(1 / 3)}
    assert metrics.count_errors(coco, [], image_ids=[3]) == {"count_mae": 0.0, "count_exact": 1.0, "count_bias": 0.0}
    assert metrics.count_errors(coco, [], image_ids=[]) == {"count_mae": 0.0, "count_exact": 0.0, "count_bias": 0.0}
