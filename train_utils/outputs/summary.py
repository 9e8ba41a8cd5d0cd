"""``summary.csv``: one row per image for a spreadsheet, written by every ``predict.py`` run.

Columns (``SUMMARY_COLUMNS``), comma-separated, one header line, rows in input order:

- ``image_id``: as in ``predictions.json`` and ``images.json``; ``file``: the image's absolute path; ``stem``: the
  name of its output files;
- ``detections``: detections scoring at least ``--score-thresh``; ``overlapping``: how many of them a DaCSeg model
  flags as crossing another (empty for Mask R-CNN); ``to_review``: how many score below ``--review-below``;
- ``mean_score``: their mean score, 4 decimals (empty without detections); ``inference_ms``: the model's time;
- ``count_flag``: empty when ``detections`` equals ``--expected-count`` (or that is 0), else the signed difference
  (``-2``: two fewer than expected);
- ``status``: ``ok``, or ``failed: <reason>`` for an image that could not be predicted (its other cells empty).

Rewritten atomically after every image, so a run that is stopped keeps what it did.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from train_utils.outputs.files import write_text_atomic

SUMMARY_CSV = "summary.csv"
SUMMARY_COLUMNS = ("image_id", "file", "stem", "detections", "overlapping", "to_review", "mean_score",
                   "inference_ms", "count_flag", "status")
DEFAULT_EXPECTED_COUNT = 46  # a normal human metaphase


def count_flag(count: int, expected: int) -> str:
    """``""`` when ``count`` is as expected (or ``expected`` is 0, no check), else ``count - expected`` with a sign."""
    return "" if expected == 0 or count == expected else f"{count - expected:+d}"


def summary_row(entry: Mapping[str, Any], scores: Sequence[float], overlapping: int | None, review_below: float,
                expected_count: int) -> dict[str, Any]:
    """The row of a predicted image from its ``images.json`` entry and its detections' scores."""
    return {"image_id": entry["id"], "file": entry["file_name"], "stem": entry["stem"], "detections": len(scores),
            "overlapping": "" if overlapping is None else overlapping,
            "to_review": sum(score < review_below for score in scores),
            "mean_score": f"{sum(scores) / len(scores):.4f}" if scores else "",
            "inference_ms": entry["inference_ms"], "count_flag": count_flag(len(scores), expected_count),
            "status": "ok"}


class SummaryCsv:
    """``summary.csv``, rewritten atomically whenever an image is added or fails."""

    def __init__(self, path: str | os.PathLike, review_below: float = 0.0,
                 expected_count: int = DEFAULT_EXPECTED_COUNT) -> None:
        self.path, self.review_below, self.expected_count = Path(path), review_below, expected_count
        self.rows: list[dict[str, Any]] = []
        self.write()

    def add(self, entry: Mapping[str, Any], scores: Sequence[float], overlapping: int | None) -> None:
        self.rows.append(summary_row(entry, scores, overlapping, self.review_below, self.expected_count))
        self.write()

    def fail(self, image_id: int, path: Path, stem: str, error: str) -> None:
        self.rows.append({"image_id": image_id, "file": str(Path(path).resolve()), "stem": stem,
                          "status": f"failed: {error}"})
        self.write()

    def write(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, SUMMARY_COLUMNS, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(self.rows, key=lambda row: row["image_id"]))
        write_text_atomic(self.path, text.getvalue())
