"""Writing an evaluation record (``train_utils.evaluation.coco_eval.evaluate_results``) as ``record_mAP.txt`` and ``record_mAP.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from train_utils.outputs.files import write_text_atomic

TXT_NAME = "record_mAP.txt"
JSON_NAME = "record_mAP.json"
_LABEL_WIDTH = 32


def _value(v: Any) -> str:
    if v is None:
        return "n/a"
    return str(v) if isinstance(v, (int, str)) else f"{v:.4f}"


def _line(label: str, value: Any) -> str:
    return f"{label + ':':<{_LABEL_WIDTH}}{_value(value)}"


def _coco_block(iou_type: str, section: Mapping[str, Any] | None) -> list[str]:
    if section is None:
        return [f"{iou_type} COCO results: not evaluated (the results have no segmentation)"]
    return [
        f"{iou_type} COCO results:",
        *section["summary_lines"],
        "",
        f"{iou_type} mAP(IoU=0.5) for each category:",
        *(f" {name:<15}: {ap:.4f}" for name, ap in section["per_class_AP50"].items()),
    ]


def _subset_lines(name: str, subset: Mapping[str, Any] | None) -> list[str]:
    subset = subset or {}
    return [
        *(_line(f"{name} {k} (segm)", subset.get(k)) for k in ("AP", "AP50", "AP75", "precision", "recall", "f1")),
        _line(f"{name} instances", subset.get("num_instances")),
    ]


def format_record(record: Mapping[str, Any]) -> str:
    """The text of ``record_mAP.txt``: per IoU type the 12 pycocotools summary lines and the AP50 of each category,
    then the chromosome metrics, one labelled line each."""
    bbox, segm = record.get("bbox"), record.get("segm")
    thresh = record["score_thresh"]
    lines = [*_coco_block("bbox", bbox), "", *_coco_block("segm", segm), ""]
    lines += [
        f"Chromosome metrics (detections with score >= {thresh:.2f}, matched one-to-one at IoU >= "
        f"{record['match_iou']:.2f}; subsets ignore detections lying on the other instances):",
        _line("precision (segm)", record.get("precision")),
        _line("recall (segm)", record.get("recall")),
        _line("f1 (segm)", record.get("f1")),
        _line("TP / FP / FN (segm)", segm and f"{segm['tp']} / {segm['fp']} / {segm['fn']}"),
        _line("precision (bbox)", bbox["precision"]),
        _line("recall (bbox)", bbox["recall"]),
        _line("f1 (bbox)", bbox["f1"]),
        _line("TP / FP / FN (bbox)", f"{bbox['tp']} / {bbox['fp']} / {bbox['fn']}"),
        *_subset_lines("overlap", record.get("overlap_segm")),
        *_subset_lines("non-overlap", record.get("non_overlap_segm")),
        _line("count MAE (per image)", record["count_mae"]),
        _line("count exact (image fraction)", record["count_exact"]),
        _line("count bias (per image)", record["count_bias"]),
        _line("images", record["num_images"]),
        _line("ground-truth instances", record["num_gt"]),
        _line(f"detections (score >= {thresh:.2f})", record["num_detections_at_thresh"]),
    ]
    if record.get("stain"):
        match = record["stain"]
        lines.append(_line("stain", f"--stain {match['mode']}, model {match['model_polarity'] or 'not recorded'}, "
                                    f"{match['inverted']} image(s) inverted"))
    return "\n".join(lines) + "\n"


def format_summary(record: Mapping[str, Any]) -> str:
    """A few numbers on one line, for the console."""
    main = "segm" if record.get("segm") is not None else "bbox"
    parts = [f"{main} AP {record[main]['AP']:.3f}", f"AP50 {record[main]['AP50']:.3f}",
             f"P {record[main]['precision']:.3f}", f"R {record[main]['recall']:.3f}", f"F1 {record[main]['f1']:.3f}"]
    if record.get("overlap_segm") is not None:
        parts.append(f"overlap AP {record['overlap_segm']['AP']:.3f}")
    parts.append(f"count MAE {record['count_mae']:.2f}")
    return "  ".join(parts)


def write_record(record: Mapping[str, Any], output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``record_mAP.txt`` and ``record_mAP.json`` into ``output_dir`` (created if needed); returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    txt_path, json_path = output_dir / TXT_NAME, output_dir / JSON_NAME
    write_text_atomic(txt_path, format_record(record))
    write_text_atomic(json_path, json.dumps(record, indent=2) + "\n")
    return txt_path, json_path
