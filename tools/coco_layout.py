"""Writing the project's COCO layout: ``root/images/<file_name>`` and ``root/annotations/instances_<split>.json``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_utils.outputs.files import write_text_atomic  # noqa: E402


def polygon_bbox_area(polygons: Sequence[Sequence[float]], height: int, width: int) -> tuple[list[float], float]:
    """COCO ``bbox`` (xywh) and ``area`` of flat polygons ``[[x0, y0, x1, y1, ...], ...]``, as pycocotools computes them."""
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    rle = mask_utils.merge(rles)
    return [float(v) for v in mask_utils.toBbox(rle)], float(mask_utils.area(rle))


def rle_from_mask(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE of a binary ``[H, W]`` mask, JSON-ready (``counts`` as str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_coco_split(
    root: str | os.PathLike,
    split: str,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/annotations/instances_<split>.json`` atomically and return its path.

    ``images`` must already be saved under ``root/images``. Other splits' files are left alone.
    """
    ann_dir = Path(root) / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    path = ann_dir / f"instances_{split}.json"
    doc = {
        "info": info or {"description": f"DaCSeg chromosome dataset, split {split}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return write_text_atomic(path, json.dumps(doc, separators=(",", ":")))
