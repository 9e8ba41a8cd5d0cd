"""Model outputs to COCO results entries (the format of ``predictions.json`` and of COCO evaluation)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils


def outputs_to_coco_results(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int],
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One COCO result dict per detection: ``image_id``, ``category_id``, ``bbox`` (xywh), ``score``,
    ``segmentation`` (compressed RLE, ``counts`` as str) when the output has ``masks``, and
    ``overlap_score`` when it has ``overlap_scores`` (DaCSeg).

    ``outputs`` are torchvision detection outputs at original image size: ``masks`` ``[N, 1, H, W]`` probabilities
    (or bool, already thresholded).
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
            masks = output["masks"].detach()[:, 0].cpu()
            rles = [  # one at a time: a copy of every mask at once would double a huge image's memory
                mask_utils.encode(np.asfortranarray((m if m.dtype == torch.bool else m > mask_threshold).numpy()
                                                    .astype(np.uint8)[:, :, None]))[0]
                for m in masks
            ]
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
