from __future__ import annotations

import json

from train_utils.evaluation.coco_eval import STAT_NAMES
from train_utils.outputs.record import format_record, format_summary, write_record

AREAS = ("all", "all", "all", "small", "medium", "large", "all", "all", "all", "small", "medium", "large")
IOUS = ("0.50:0.95", "0.50", "0.75") + ("0.50:0.95",) * 9
MAX_DETS = (100,) * 6 + (1, 10) + (100,) * 4


def coco_section(stats: list[float], ap50: dict[str, float], prf: tuple[float, float, float, int, int, int]) -> dict:
    lines = []
    for k, s in enumerate(stats):  # what pycocotools' summarize() prints
        title, kind = ("Average Precision", "(AP)") if k < 6 else ("Average Recall", "(AR)")
        lines.append(f" {title:<18} {kind} @[ IoU={IOUS[k]:<9} | area={AREAS[k]:>6s} | maxDets={MAX_DETS[k]:>3d} ] = {s:0.3f}")
    p, r, f1, tp, fp, fn = prf
    return {"stats": stats, **dict(zip(STAT_NAMES, stats)), "per_class_AP50": ap50, "summary_lines": lines,
            "precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def sample_record() -> dict:
    bbox = coco_section([0.61, 0.95, 0.7, 0.6, -1.0, -1.0, 0.05, 0.5, 0.66, 0.66, -1.0, -1.0],
                        {"chromosome": 0.95, "nucleus": -1.0}, (0.9, 0.8, 0.84705882, 36, 4, 9))
    segm = coco_section([0.55, 0.93, 0.6, 0.55, -1.0, -1.0, 0.04, 0.45, 0.6, 0.6, -1.0, -1.0],
                        {"chromosome": 0.93, "nucleus": -1.0}, (0.875, 0.77777778, 0.82352941, 35, 5, 10))
    return {
        "score_thresh": 0.5, "match_iou": 0.5, "iou_types": ["bbox", "segm"],
        "num_images": 2, "num_gt": 45, "num_detections": 61, "num_detections_at_thresh": 40,
        "bbox": bbox, "segm": segm, "precision": 0.875, "recall": 0.77777778, "f1": 0.82352941,
        "overlap_segm": {"AP": 0.31, "AP50": 0.72, "AP75": 0.25, "precision": 0.7, "recall": 0.6, "f1": 0.64615385,
                         "tp": 6, "fp": 3, "fn": 4, "num_instances": 10},
        "non_overlap_segm": {"AP": 0.62, "AP50": 0.97, "AP75": 0.71, "precision": 0.9, "recall": 0.83, "f1": 0.86358382,
                             "tp": 29, "fp": 2, "fn": 6, "num_instances": 35},
        "count_mae": 2.5, "count_exact": 0.0, "count_bias": -2.5,
    }


def coco_text(iou_type: str, stats: list[float], ap50: str) -> str:
    """A COCO block of record_mAP.txt: the 12 lines pycocotools printed (copied as they are), the per-class AP50."""
    lines = "\n".join(coco_section(stats, {}, (0, 0, 0, 0, 0, 0))["summary_lines"])
    return f"{iou_type} COCO results:\n{lines}\n\n{iou_type} mAP(IoU=0.5) for each category:\n{ap50}\n"


PER_CLASS = " chromosome     : {:.4f}\n nucleus        : -1.0000"
EXPECTED = coco_text("bbox", sample_record()["bbox"]["stats"], PER_CLASS.format(0.95)) + "\n" + coco_text(
    "segm", sample_record()["segm"]["stats"], PER_CLASS.format(0.93)) + """
Chromosome metrics (detections with score >= 0.50, matched one-to-one at IoU >= 0.50; subsets ignore detections lying on the other instances):
precision (segm):               0.8750
recall (segm):                  0.7778
f1 (segm):                      0.8235
TP / FP / FN (segm):            35 / 5 / 10
precision (bbox):               0.9000
recall (bbox):                  0.8000
f1 (bbox):                      0.8471
TP / FP / FN (bbox):            36 / 4 / 9
overlap AP (segm):              0.3100
overlap AP50 (segm):            0.7200
overlap AP75 (segm):            0.2500
overlap precision (segm):       0.7000
overlap recall (segm):          0.6000
overlap f1 (segm):              0.6462
overlap instances:              10
non-overlap AP (segm):          0.6200
non-overlap AP50 (segm):        0.9700
non-overlap AP75 (segm):        0.7100
non-overlap precision (segm):   0.9000
non-overlap recall (segm):      0.8300
non-overlap f1 (segm):          0.8636
non-overlap instances:          35
count MAE (per image):          2.5000
count exact (image fraction):   0.0000
count bias (per image):         -2.5000
images:                         2
ground-truth instances:         45
detections (score >= 0.50):     40
"""


def test_record_txt_format_is_pinned(tmp_path):
    record = sample_record()
    txt_path, json_path = write_record(record, tmp_path / "out")  # the folder is created
    assert (txt_path.name, json_path.name) == ("record_mAP.txt", "record_mAP.json")
    assert txt_path.read_text() == EXPECTED == format_record(record)


def test_record_json_round_trips(tmp_path):
    record = sample_record()
    _, json_path = write_record(record, tmp_path)
    assert json.loads(json_path.read_text()) == record


def test_record_without_masks_says_so(tmp_path):
    record = sample_record()
    record.update(segm=None, precision=None, recall=None, f1=None, overlap_segm=None, non_overlap_segm=None,
                  iou_types=["bbox"])
    text = write_record(record, tmp_path)[0].read_text()
    assert "segm COCO results: not evaluated (the results have no segmentation)\n" in text
    assert "\nprecision (segm):               n/a\n" in text
    assert "\noverlap AP (segm):              n/a\n" in text
    assert "\nprecision (bbox):               0.9000\n" in text
    assert json.loads((tmp_path / "record_mAP.json").read_text())["segm"] is None


def test_summary_line():
    assert format_summary(sample_record()) == (
        "segm AP 0.550  AP50 0.930  P 0.875  R 0.778  F1 0.824  overlap AP 0.310  count MAE 2.50"
    )
