from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from train_utils.evaluation.coco_eval import STAT_NAMES, evaluate_results

H = W = 64
A, B, C = (5, 5, 20, 20), (35, 5, 20, 20), (5, 35, 20, 20)
X1, X2 = (30, 35, 20, 8), (36, 30, 8, 20)  # a crossing pair: 8x8 = 64 px shared


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def rect_rle(x, y, w, h):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_coco(boxes_per_image: dict[int, list[tuple]]) -> COCO:
    """Rectangles as ground truth, ``{image_id: [(x, y, w, h[, category_id]), ...]}``; no ``overlapping`` flags."""
    images = [{"id": i, "width": W, "height": H, "file_name": f"{i}.png"} for i in boxes_per_image]
    anns = []
    for image_id, boxes in boxes_per_image.items():
        for x, y, w, h, *cat in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat[0] if cat else 1, "iscrowd": 0,
                         "bbox": [x, y, w, h], "area": w * h, "segmentation": rect_rle(x, y, w, h)})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": 1, "name": "chromosome"}, {"id": 2, "name": "nucleus"}]}
    quiet(coco.createIndex)
    return coco


def det(image_id, x, y, w, h, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h], "score": score,
            "segmentation": rect_rle(x, y, w, h)}


def gt_as_results(coco: COCO, image_ids=None) -> list[dict]:
    out = []
    for a in coco.loadAnns(coco.getAnnIds(imgIds=image_ids or [])):
        rle = coco.annToRLE(a)
        counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
                    "score": 1.0, "segmentation": {"size": rle["size"], "counts": counts}})
    return out


def plain_pycocotools(coco_gt: COCO, results: list[dict], iou_type: str, printed: list[str] | None = None) -> list[float]:
    """What pycocotools gives on its own; segm results without bbox so detections keep their mask area (the COCO
    convention, as detectron2 does)."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    gt = COCO()
    gt.dataset = copy.deepcopy(coco_gt.dataset)
    quiet(gt.createIndex)
    dt = quiet(gt.loadRes, [{k: v for k, v in copy.deepcopy(r).items() if k != drop} for r in results])
    ev = COCOeval(gt, dt, iou_type)
    quiet(ev.evaluate)
    quiet(ev.accumulate)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.summarize()
    if printed is not None:
        printed.extend(out.getvalue().splitlines())
    return [float(s) for s in ev.stats]


@pytest.fixture(scope="module")
def tiny_val(tiny_coco) -> COCO:
    return quiet(COCO, str(tiny_coco / "annotations" / "instances_val.json"))


def test_ground_truth_as_predictions_is_perfect(tiny_val):
    before = copy.deepcopy(tiny_val.dataset)
    record = evaluate_results(tiny_val, gt_as_results(tiny_val))
    for iou_type in ("bbox", "segm"):
        assert record[iou_type]["AP"] == 1.0 and record[iou_type]["AP50"] == 1.0
        assert record[iou_type]["per_class_AP50"] == {"chromosome": 1.0}
        assert record[iou_type]["precision"] == record[iou_type]["recall"] == record[iou_type]["f1"] == 1.0
    assert record["precision"] == record["recall"] == record["f1"] == 1.0
    assert record["count_mae"] == 0.0 and record["count_exact"] == 1.0
    for key in ("overlap_segm", "non_overlap_segm"):
        assert record[key]["AP"] == 1.0 and record[key]["recall"] == 1.0 and record[key]["num_instances"] == 4
    assert (record["num_images"], record["num_gt"], record["num_detections"]) == (2, 8, 8)
    assert tiny_val.dataset == before  # pycocotools wrote into a private copy, not the caller's COCO


def test_hand_made_perfect_and_record_keys():
    coco = make_coco({1: [A, B, X1, X2], 2: [C]})
    record = evaluate_results(coco, gt_as_results(coco))
    assert record["segm"]["AP"] == 1.0 and record["f1"] == 1.0 and record["count_mae"] == 0.0
    assert record["overlap_segm"]["num_instances"] == 2 and record["non_overlap_segm"]["num_instances"] == 3
    for iou_type in ("bbox", "segm"):
        section = record[iou_type]
        assert len(section["stats"]) == 12 and len(section["summary_lines"]) == 12
        assert [section[n] for n in STAT_NAMES] == section["stats"]
    assert record["segm"]["per_class_AP50"] == {"chromosome": 1.0, "nucleus": -1.0}  # no nucleus in the ground truth


def test_twelve_stats_equal_plain_pycocotools(tiny_val):
    rng = np.random.default_rng(0)
    results = []
    for r in gt_as_results(tiny_val):
        for _ in range(2):  # shifted copies of each instance, random scores
            dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
            rle = mask_utils.encode(np.roll(mask_utils.decode(r["segmentation"]), (dy, dx), axis=(0, 1)))
            x, y, w, h = r["bbox"]
            results.append({"image_id": r["image_id"], "category_id": 1, "score": float(rng.uniform(0.05, 1)),
                            "bbox": [x + dx + 1.5, y + dy - 0.5, w, h],
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    big = np.zeros((128, 160), np.uint8)
    big[:60, :50] = 1  # a large false positive (another area range)
    rle = mask_utils.encode(np.asfortranarray(big))
    results.append({"image_id": 1, "category_id": 1, "score": 0.7, "bbox": [0, 0, 50, 60],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    record = evaluate_results(tiny_val, results)
    for iou_type in ("bbox", "segm"):
        printed: list[str] = []
        assert record[iou_type]["stats"] == pytest.approx(plain_pycocotools(tiny_val, results, iou_type, printed), abs=1e-12)
        assert record[iou_type]["summary_lines"] == printed  # the exact text pycocotools prints
    assert 0 < record["segm"]["AP"] < 1


def test_empty_results_give_zeros_and_minus_one_without_ground_truth(tiny_val):
    record = evaluate_results(tiny_val, [])
    for iou_type in ("bbox", "segm"):
        stats = record[iou_type]["stats"]
        assert stats == plain_pycocotools_empty(tiny_val, iou_type)
        assert stats[0] == 0.0 and stats[4] == -1.0  # no medium-sized ground truth: -1, as pycocotools says
        assert record[iou_type]["per_class_AP50"] == {"chromosome": 0.0}
    assert (record["precision"], record["recall"], record["f1"]) == (0.0, 0.0, 0.0)
    assert record["segm"]["fn"] == 8 and record["count_mae"] == 4.0 and record["count_exact"] == 0.0
    assert record["overlap_segm"]["AP"] == 0.0 and record["overlap_segm"]["num_instances"] == 4


def plain_pycocotools_empty(coco_gt, iou_type):
    # loadRes cannot take []; an empty results COCO is what pycocotools would evaluate
    dt = COCO()
    dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []}
    quiet(dt.createIndex)
    ev = COCOeval(copy_of(coco_gt), dt, iou_type)
    quiet(ev.evaluate)
    quiet(ev.accumulate)
    quiet(ev.summarize)
    return [float(s) for s in ev.stats]


def copy_of(coco):
    out = COCO()
    out.dataset = copy.deepcopy(coco.dataset)
    quiet(out.createIndex)
    return out


def test_images_without_ground_truth():
    coco = make_coco({1: [A], 2: []})
    record = evaluate_results(coco, [det(1, *A, 0.9), det(2, *B, 0.8)])  # a false positive on the empty image
    assert record["segm"]["tp"] == 1 and record["segm"]["fp"] == 1 and record["precision"] == 0.5
    assert record["count_mae"] == 0.5 and record["count_exact"] == 0.5
    assert record["segm"]["AP50"] == pytest.approx(1.0)  # the FP scores lower than the TP
    nothing = evaluate_results(make_coco({1: []}), [])
    assert nothing["segm"]["stats"] == [-1.0] * 12 and nothing["count_exact"] == 1.0
    assert nothing["overlap_segm"]["num_instances"] == 0 and nothing["overlap_segm"]["AP"] == -1.0


def test_many_classes():
    coco = make_coco({1: [A, (35, 5, 20, 20, 2)], 2: [(5, 35, 20, 20, 2)]})
    results = [det(1, *A, 0.9), det(1, *B, 0.8, category_id=1),  # B found but called a chromosome
               det(2, *C, 0.8, category_id=2)]
    record = evaluate_results(coco, results, label_names={2: "blob"})
    assert record["segm"]["per_class_AP50"] == pytest.approx({"chromosome": 1.0, "blob": 51 / 101})
    assert (record["segm"]["tp"], record["segm"]["fp"], record["segm"]["fn"]) == (2, 1, 1)
    assert record["segm"]["stats"] == pytest.approx(plain_pycocotools(coco, results, "segm"))


def test_overlap_subset_ignores_detections_on_the_other_instances():
    coco = make_coco({1: [A, X1, X2]})  # A alone, X1 and X2 cross
    base = [det(1, *X1, 0.6), det(1, 50, 50, 10, 10, 0.5)]  # X1 found, a background FP, X2 missed
    with_a = base + [det(1, *A, 0.9)]  # a correct detection on the non-overlapping instance, scored highest
    before, after = evaluate_results(coco, base), evaluate_results(coco, with_a)
    for key in ("AP", "AP50", "AP75", "precision", "recall", "f1"):
        assert after["overlap_segm"][key] == before["overlap_segm"][key], key
    assert after["overlap_segm"]["precision"] == 0.5 and after["overlap_segm"]["recall"] == 0.5
    assert after["overlap_segm"]["AP50"] == pytest.approx(0.5, abs=0.01)  # were A's detection a FP, it would be ~0.25
    assert after["non_overlap_segm"]["recall"] == 1.0 and before["non_overlap_segm"]["recall"] == 0.0
    assert after["precision"] > before["precision"]  # it does count on the whole set
    # a duplicate and a fragment on A are A's subset's errors, not the overlap subset's
    on_a = with_a + [det(1, 6, 5, 20, 20, 0.85), det(1, 10, 10, 6, 6, 0.95)]  # the fragment outscores A
    worse = evaluate_results(coco, on_a)
    assert worse["overlap_segm"] == after["overlap_segm"]
    assert worse["non_overlap_segm"]["fp"] == after["non_overlap_segm"]["fp"] + 2
    assert worse["non_overlap_segm"]["AP50"] < after["non_overlap_segm"]["AP50"]


def test_subset_evaluation_over_all_areas_only_gives_the_same_ap(tiny_val):
    from train_utils.evaluation.coco_eval import _as_crowd, _results_coco, check_results, copy_coco, run_cocoeval

    gt = copy_coco(tiny_val)
    dets = check_results(gt, [dict(r, score=0.1 * (k % 9 + 1)) for k, r in enumerate(gt_as_results(tiny_val))][::2])
    dt = _results_coco(gt, dets, "segm")
    ignored = [a["id"] for a in gt.dataset["annotations"] if a["overlapping"]]
    with _as_crowd(gt, ignored):
        full, _ = run_cocoeval(gt, dt, "segm", None)
        quick, _ = run_cocoeval(gt, dt, "segm", None, all_areas_only=True)
    assert list(quick.stats[:3]) == list(full.stats[:3]) and 0 < full.stats[0] < 1
    assert list(quick.stats[3:6]) == [-1.0] * 3 and list(quick.stats[6:9]) == list(full.stats[6:9])
    assert all(a["iscrowd"] == 0 for a in gt.dataset["annotations"])  # restored afterwards


def test_results_with_unknown_ids_or_bad_entries_raise_clear_errors(tiny_val):
    good = gt_as_results(tiny_val)
    with pytest.raises(ValueError, match=r"image id\(s\) not in the ground truth: 7, 99"):
        evaluate_results(tiny_val, good + [dict(good[0], image_id=99), dict(good[0], image_id=7)])
    with pytest.raises(ValueError, match=r"category id\(s\) not in the ground truth: 5"):
        evaluate_results(tiny_val, [dict(good[0], category_id=5)])
    with pytest.raises(ValueError, match=r"result 1 .*has no score"):
        evaluate_results(tiny_val, [good[0], {k: v for k, v in good[1].items() if k != "score"}])
    with pytest.raises(ValueError, match=r"mask size \[64, 64\] is not the image size \[128, 160\]"):
        evaluate_results(tiny_val, [dict(good[0], segmentation=rect_rle(*A))])
    with pytest.raises(ValueError, match="mix detections with and without segmentation"):
        evaluate_results(tiny_val, [good[0], {k: v for k, v in good[1].items() if k != "segmentation"}])
    with pytest.raises(ValueError, match=r"result 0 has image_id '1'; expected an integer"):
        evaluate_results(tiny_val, [dict(good[0], image_id="1")])
    with pytest.raises(ValueError, match=r"result 0 \(image 1\): bbox \[1, 2\] is not \[x, y, width, height\]"):
        evaluate_results(tiny_val, [{k: v for k, v in good[0].items() if k != "segmentation"} | {"bbox": [1, 2]}])
    with pytest.raises(ValueError, match=r"result 0 \(image 1\): unreadable segmentation"):
        evaluate_results(tiny_val, [dict(good[0], segmentation={"size": [128, 160], "counts": [1, "x"]})])
    with pytest.raises(ValueError, match="score threshold"):
        evaluate_results(tiny_val, good, score_thresh=1.5)


def test_box_only_and_polygon_results():
    coco = make_coco({1: [A, B]})
    boxes = [{k: v for k, v in det(1, *A, 0.9).items() if k != "segmentation"}]
    record = evaluate_results(coco, boxes)
    assert record["iou_types"] == ["bbox"] and record["segm"] is None and record["overlap_segm"] is None
    assert record["bbox"]["tp"] == 1 and record["bbox"]["recall"] == 0.5 and record["precision"] is None
    x, y, w, h = B
    polygon = {"image_id": 1, "category_id": 1, "score": 0.8,
               "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}  # no bbox: taken from the mask
    record = evaluate_results(coco, [det(1, *A, 0.9), polygon])
    assert record["segm"]["tp"] == 2 and record["bbox"]["tp"] == 2


def test_image_ids_restrict_the_evaluation():
    coco = make_coco({1: [A], 2: [B]})
    record = evaluate_results(coco, [det(1, *A, 0.9)], image_ids=[1])
    assert record["num_images"] == 1 and record["recall"] == 1.0 and record["segm"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside the evaluated images: 1"):
        evaluate_results(coco, [det(1, *A, 0.9)], image_ids=[2])
    # no image evaluated: no ground truth either (pycocotools' getAnnIds(imgIds=[]) would return all of it)
    record = evaluate_results(coco, [], image_ids=[])
    assert record["num_images"] == 0 and record["num_gt"] == 0 and record["segm"]["fn"] == 0


def random_case(seed: int, size: int = 160) -> tuple[COCO, list[dict]]:
    """Rectangles of all area ranges on several images and 2 categories, with crowd and ``ignore`` ground truth,
    duplicate ground truth and detections, jittered copies, ties in score, false positives, one image with more
    than 100 detections, and images without ground truth or without detections."""
    rng = np.random.default_rng(seed)

    def box():
        w, h = (int(v) for v in rng.choice([4, 12, 30, 50, 100, 130], size=2) + rng.integers(0, 8, size=2))
        return int(rng.integers(0, size - w)), int(rng.integers(0, size - h)), w, h

    def rle(x, y, w, h):
        mask = np.zeros((size, size), np.uint8)
        mask[y:y + h, x:x + w] = 1
        out = mask_utils.encode(np.asfortranarray(mask))
        return {"size": out["size"], "counts": out["counts"].decode("ascii")}

    images, anns, results = [], [], []
    for image_id in range(1, 8):
        images.append({"id": image_id, "width": size, "height": size, "file_name": f"{image_id}.png"})
        boxes = [] if image_id == 2 else [box() for _ in range(int(rng.integers(1, 10)))]
        boxes += boxes[:1]  # a duplicate ground truth: IoU ties between two of them
        if image_id == 1:
            boxes += [(2, 2, 10, 10), (20, 20, 50, 50), (30, 30, 120, 120)]  # small, medium, large for sure
        for x, y, w, h in boxes:
            ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 3)),
                   "iscrowd": int(rng.random() < 0.15), "bbox": [x, y, w, h], "area": w * h,
                   "segmentation": rle(x, y, w, h)}
            if rng.random() < 0.15:
                ann["ignore"] = 1
            anns.append(ann)
            if image_id == 3:
                continue
            for _ in range(int(rng.integers(0, 4))):  # jittered copies, the odd one in the wrong category
                dx, dy, dw, dh = (int(v) for v in rng.integers(-3, 4, size=4))
                jx, jy = min(max(x + dx, 0), size - 2), min(max(y + dy, 0), size - 2)
                jw, jh = max(1, min(w + dw, size - jx)), max(1, min(h + dh, size - jy))
                cat = ann["category_id"] if rng.random() < 0.9 else 3 - ann["category_id"]
                results.append(det(image_id, jx, jy, jw, jh, 0, cat) | {"segmentation": rle(jx, jy, jw, jh)})
            if rng.random() < 0.3:  # an exact duplicate
                results.append(det(image_id, x, y, w, h, 0, ann["category_id"]) | {"segmentation": rle(x, y, w, h)})
            if rng.random() < 0.3:  # box IoU 1 - 1e-11: matches at threshold 1, which pycocotools caps at 1 - 1e-10
                results.append(det(image_id, x, y, w, h, 0, ann["category_id"])
                               | {"bbox": [x, y, w * (1 - 1e-11), h], "segmentation": rle(x, y, w, h)})
        # image 2: only false positives, image 3: no detections, image 4: more than 100 in category 1
        num_fp = {2: 3, 3: 0, 4: 130}.get(image_id, int(rng.integers(0, 4)))
        for _ in range(num_fp):
            x, y, w, h = box()
            cat = 1 if image_id == 4 else int(rng.integers(1, 3))
            results.append(det(image_id, x, y, w, h, 0, cat) | {"segmentation": rle(x, y, w, h)})
    for r in results:
        r["score"] = float(rng.integers(1, 40)) / 40  # coarse: many ties, settled by order
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": 1, "name": "chromosome"}, {"id": 2, "name": "nucleus"}]}
    quiet(coco.createIndex)
    return coco, results


def ours_and_pycocotools(coco_gt: COCO, results: list[dict], iou_type: str, crowd_ids=()):
    """(our run_cocoeval, plain pycocotools) on private copies; ``crowd_ids`` scores the subset of the others, ours
    through ``_as_crowd``, pycocotools' by crowd flags written into its own copy."""
    from train_utils.evaluation.coco_eval import _as_crowd, run_cocoeval

    drop = "segmentation" if iou_type == "bbox" else "bbox"
    dets = [{k: v for k, v in copy.deepcopy(r).items() if k != drop} for r in results]
    gt = copy_of(coco_gt)
    with _as_crowd(gt, crowd_ids):
        ours, lines = run_cocoeval(gt, quiet(gt.loadRes, copy.deepcopy(dets)), iou_type)
    reference = copy_of(coco_gt)
    for ann in reference.dataset["annotations"]:
        if ann["id"] in set(crowd_ids):
            ann["iscrowd"] = 1
    ev = COCOeval(reference, quiet(reference.loadRes, dets), iou_type)
    quiet(ev.evaluate)
    quiet(ev.accumulate)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ev.summarize()
    return ours, lines, ev, printed.getvalue().splitlines()


@pytest.mark.parametrize("seed, iou_type", [(0, "bbox"), (1, "segm"), (2, "bbox"), (3, "segm"), (5, "segm")])
@pytest.mark.parametrize("subset", [False, True], ids=["all", "subset"])
def test_faster_coco_eval_equals_plain_pycocotools(seed, iou_type, subset):
    """faster-coco-eval is a requirement because it gives pycocotools' numbers: every stat and printed line, on
    crowds, ``ignore`` keys, duplicates, ties, > 100 detections, empty images, all area ranges, and with the other
    instances turned into crowd regions (the overlap subsets)."""
    coco, results = random_case(seed)
    crowd_ids = [a["id"] for a in coco.dataset["annotations"] if a["id"] % 3 == 0] if subset else []
    ours, lines, theirs, printed = ours_and_pycocotools(coco, results, iou_type, crowd_ids)
    assert list(ours.stats) == pytest.approx(list(theirs.stats), abs=1e-12)
    assert lines == printed
    assert 0 < theirs.stats[0] < 1 and all(s > -1 for s in theirs.stats)  # every area range has ground truth
    matched = [e for e in theirs.evalImgs if e is not None]
    assert any(e["dtIgnore"].any() for e in matched) and any(len(e["dtIds"]) == 100 for e in matched)
    if subset:  # the subset changes the numbers
        assert list(theirs.stats) != list(ours_and_pycocotools(coco, results, iou_type)[2].stats)


