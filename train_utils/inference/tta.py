"""Test-time flips: run a detector on an image and on its horizontal, vertical and double flip, map every detection
back, and merge the four views by mask matching.

Each view runs through ``inference.detect``, its masks kept at their box size (``train_utils.masks``). Merging: all
detections of the four views, highest score first, are grouped greedily; a detection joins the first group whose
leading mask it overlaps at mask IoU >= ``match_iou`` and that has no member from its view yet. A group becomes one
detection: its mask is the mean of the members' mask probabilities, its box that mask's box, its score (and DaCSeg
``overlap_score``) the sum over members divided by the four views, so a chromosome seen in one view only keeps a
quarter of its score and survives only if that still reaches the score threshold. The merged detections are capped
at the model's ``detections_per_img`` (``--detections-per-img``), best score first, as without flips.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torchvision.ops import box_iou, masks_to_boxes

from train_utils.inference.detect import detect
from train_utils.masks import BoxMasks, Window, as_box_masks

VIEWS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))  # dims flipped: none, horizontal, vertical, both
MERGED_KEYS = ("boxes", "labels", "scores", "masks", "overlap_scores")


def _unflip(output: dict[str, Any], dims: tuple[int, ...], size: tuple[int, int]) -> dict[str, Any]:
    """A view's detections in the original image's frame."""
    height, width = size
    boxes = output["boxes"].clone()
    if -1 in dims:
        boxes[:, [0, 2]] = width - output["boxes"][:, [2, 0]]
    if -2 in dims:
        boxes[:, [1, 3]] = height - output["boxes"][:, [3, 1]]
    return {**output, "boxes": boxes, "masks": as_box_masks(output["masks"]).flip(dims)}


def _mask_iou(masks: BoxMasks, i: int, j: int, boxes: torch.Tensor) -> float:
    """IoU of bool masks ``i`` and ``j``, counted inside their boxes' union only (the masks lie in their boxes)."""
    x0, y0 = (torch.minimum(boxes[i, :2], boxes[j, :2]).floor().clamp(min=0)).int().tolist()
    x1, y1 = torch.maximum(boxes[i, 2:], boxes[j, 2:]).ceil().int().tolist()
    height, width = masks.size
    window = (x0, y0, min(x1 + 1, width), min(y1 + 1, height))
    a, b = masks.crop(i, window), masks.crop(j, window)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def _union(masks: BoxMasks, group: Sequence[int]) -> Window:
    """The window holding the regions of the group's masks."""
    regions = masks.regions[list(group)]
    regions = regions[(regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1])]
    if not len(regions):
        return (0, 0, 0, 0)
    return (*regions[:, :2].amin(dim=0).tolist(), *regions[:, 2:].amax(dim=0).tolist())


def merge_views(views: Sequence[dict[str, Any]], score_thresh: float = 0.0, match_iou: float = 0.5,
                mask_thresh: float = 0.5, max_detections: int | None = None) -> dict[str, Any]:
    """One output from the views' outputs (already in the original frame; ``masks`` probabilities, as ``BoxMasks``
    or ``[N, 1, H, W]``); see the module docstring. Groups whose merged score is below ``score_thresh`` are dropped,
    and only the ``max_detections`` best are kept (None: all). The merged masks are ``BoxMasks`` of probabilities,
    each over the window of its members' masks."""
    view_of = torch.cat([torch.full((len(v["scores"]),), k) for k, v in enumerate(views)])
    keys = [key for key in views[0] if key in MERGED_KEYS]
    every = {key: torch.cat([v[key] for v in views]) for key in keys if key != "masks"}
    masks = BoxMasks.cat([as_box_masks(v["masks"]) for v in views])
    order = every["scores"].argsort(descending=True)
    binary = masks.binary(mask_thresh)
    touching = box_iou(every["boxes"], every["boxes"]) > 0  # only these pairs can share mask pixels
    groups: list[list[int]] = []
    for i in order.tolist():
        for group in groups:
            lead = group[0]
            if (touching[lead, i] and every["labels"][lead] == every["labels"][i]
                    and all(view_of[j] != view_of[i] for j in group)
                    and _mask_iou(binary, lead, i, every["boxes"]) >= match_iou):
                group.append(i)
                break
        else:
            groups.append([i])
    merged: dict[str, list[Any]] = {key: [] for key in keys}
    windows: list[Window] = []
    for group in groups:
        index = torch.tensor(group)
        score = every["scores"][index].sum() / len(views)
        if score < score_thresh:
            continue
        window = _union(masks, group)
        mask = torch.stack([masks.crop(k, window) for k in group]).mean(dim=0)
        merged["scores"].append(score)
        merged["labels"].append(every["labels"][group[0]])
        merged["masks"].append(mask)
        windows.append(window)
        if "overlap_scores" in every:
            merged["overlap_scores"].append(every["overlap_scores"][index].sum() / len(views))
        present = mask > mask_thresh
        corner = torch.tensor([window[0], window[1], window[0] + 1, window[1] + 1], dtype=torch.float32)
        merged["boxes"].append(masks_to_boxes(present[None])[0] + corner if present.any() else every["boxes"][group[0]])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "overlap_scores": torch.zeros(0)}
    out: dict[str, Any] = {}
    for key, values in merged.items():
        if key == "masks":
            out[key] = BoxMasks(values, windows, masks.size)
        else:
            out[key] = torch.stack(values) if values else empty[key]
    order = out["scores"].argsort(descending=True)[:max_detections]
    return {key: value[order] for key, value in out.items()}


def detections_per_img(model: nn.Module) -> int | None:
    """The most detections the model returns per image: its RoI heads' limit, or an exported model's config's."""
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        return int(heads.detections_per_img)
    config = getattr(model, "config", None)
    return None if config is None else int(config.box_detections_per_img)


class FlipTTA(nn.Module):
    """A detector in eval mode behind test-time flips: same inputs and outputs as the detector's inference, and at
    most as many detections per image (``max_detections``; default the model's own limit)."""

    def __init__(self, model: nn.Module, score_thresh: float = 0.0, match_iou: float = 0.5, mask_thresh: float = 0.5,
                 max_detections: int | None = None):
        super().__init__()
        self.model, self.score_thresh, self.match_iou, self.mask_thresh = model, score_thresh, match_iou, mask_thresh
        self.max_detections = max_detections if max_detections is not None else detections_per_img(model)

    @property
    def roi_heads(self) -> nn.Module:
        return self.model.roi_heads

    def forward(self, images: Sequence[torch.Tensor], targets=None) -> list[dict[str, Any]]:
        if self.training:
            raise RuntimeError("FlipTTA is for inference; train the model itself")
        results = []
        for image in images:
            size = (int(image.shape[-2]), int(image.shape[-1]))
            views = [_unflip(detect(self.model, [image.flip(dims) if dims else image], mask_thresh=None)[0], dims, size)
                     for dims in VIEWS]
            results.append(merge_views(views, self.score_thresh, self.match_iou, self.mask_thresh,
                                       self.max_detections))
        return results
