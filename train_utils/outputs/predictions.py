"""``predictions.json`` and ``images.json``, the files ``predict.py`` writes for programs to read, and the COCO
results entries that evaluation scores.

- ``predictions.json``: a COCO results list (what ``COCO.loadRes`` and ``validation.py --results-json`` read), one
  detection per line: ``image_id``, ``category_id``, ``bbox`` (xywh), ``score``, ``segmentation`` (compressed RLE,
  ``counts`` as a string) and, for DaCSeg, ``overlap_score``.
- ``images.json``: maps each ``image_id`` back to its file, as COCO ``images`` / ``categories`` sections:
  ``{"images": [{"id", "file_name", "width", "height", "stem", "num_detections", "num_overlapping",
  "inference_ms", "polarity", "inverted"}], "categories": [{"id", "name"}], "failed": [{"id", "file_name",
  "error"}]}``; ``file_name`` is the image's absolute path, ``polarity`` its stain polarity (``bright-on-dark`` or
  ``dark-on-bright``) and ``inverted`` whether the model saw it inverted (``--stain``).

Both are complete JSON after every image, so a run that is stopped keeps what it did.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from train_utils.masks import as_box_masks
from train_utils.outputs.files import json_lines, write_text_atomic

PREDICTIONS_JSON = "predictions.json"
IMAGES_JSON = "images.json"


def box_mask_rle(patch: np.ndarray, region: Sequence[int], size: tuple[int, int]) -> dict[str, Any]:
    """The compressed COCO RLE (``size``, ``counts`` as bytes) of the ``[H, W]`` image mask that is the bool
    ``patch`` at ``region`` (x0, y0, x1, y1) and empty elsewhere, encoded without the image-sized array: exactly
    what ``pycocotools.mask.encode`` gives for the pasted mask."""
    height, width = size
    x0, y0, x1, y1 = (int(v) for v in region)
    if not patch.any():
        return mask_utils.frPyObjects({"size": [height, width], "counts": [height * width]}, height, width)
    strip = np.zeros((height, x1 - x0), dtype=np.uint8)  # the region's columns at the image's height
    strip[y0:y1] = patch
    column_major = strip.ravel(order="F")  # COCO runs go down each column, then to the next
    edges = np.flatnonzero(column_major[1:] != column_major[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [column_major.size]])).tolist()
    before, after = x0 * height, (width - x1) * height  # the empty columns left and right of the region
    counts = [before] + runs if column_major[0] else [before + runs[0]] + runs[1:]
    if column_major[-1]:
        counts += [after] if after else []
    else:
        counts[-1] += after
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


def outputs_to_coco_results(
    outputs: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int],
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One COCO result dict per detection: ``image_id``, ``category_id``, ``bbox`` (xywh), ``score``,
    ``segmentation`` (compressed RLE, ``counts`` as str) when the output has ``masks``, and
    ``overlap_score`` when it has ``overlap_scores`` (DaCSeg).

    ``outputs`` are torchvision detection outputs at original image size, ``masks`` as ``train_utils.masks.BoxMasks``
    or ``[N, 1, H, W]``, bool or probabilities (> ``mask_threshold``); each mask is encoded from its box.
    """
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = output["scores"].detach().float().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        rles = None
        if "masks" in output:
            masks = as_box_masks(output["masks"]).cpu().binary(mask_threshold)
            rles = [box_mask_rle(patch.numpy(), region, masks.size)
                    for patch, region in zip(masks.patches, masks.regions.tolist())]
        overlap = output.get("overlap_scores")
        overlap = overlap.detach().float().cpu().tolist() if overlap is not None else None
        for k in range(len(scores)):
            entry: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(label_to_cat_id[int(labels[k])]),
                "bbox": [round(float(v), 2) for v in xywh[k]],
                "score": round(float(scores[k]), 5),
            }
            if rles is not None:
                rle = rles[k]
                entry["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            if overlap is not None:
                entry["overlap_score"] = round(float(overlap[k]), 5)
            results.append(entry)
    return results


class PredictionsWriter:
    """``predictions.json`` written as it grows: a JSON list, one COCO result object per line, whose closing bracket
    is rewritten after every ``add``, so the file is whole JSON whenever a crash or a kill stops the run."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.file = open(path, "wb")
        self.body_end, self.count = 1, 0  # the closing "]" starts after the "["
        self.file.write(b"[]\n")
        self.file.flush()

    def add(self, results: Sequence[Mapping[str, Any]]) -> None:
        if not results:
            return
        self.file.seek(self.body_end)
        self.file.write((",\n" if self.count else "\n").encode() + json_lines(results).encode())
        self.body_end, self.count = self.file.tell(), self.count + len(results)
        self.file.write(b"\n]\n")
        self.file.truncate()
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ImagesIndex:
    """``images.json``, rewritten atomically whenever an image is added or fails."""

    def __init__(self, path: str | os.PathLike, label_names: Mapping[int, str], label_to_cat_id: Mapping[int, int]):
        self.path = Path(path)
        self.categories = [{"id": int(label_to_cat_id[k]), "name": label_names[k]} for k in sorted(label_names)]
        self.images: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.write()

    def add(self, entry: dict[str, Any]) -> None:
        self.images.append(entry)
        self.write()

    def fail(self, image_id: int, path: Path, error: str) -> None:
        self.failed.append({"id": image_id, "file_name": str(path.resolve()), "error": error})
        self.write()

    def write(self) -> None:
        index = {"images": self.images, "categories": self.categories, "failed": self.failed}
        write_text_atomic(self.path, json.dumps(index, indent=1) + "\n")
