"""Test-time flips: run a detector on an image and on its horizontal, vertical and double flip, map every detection
back, and merge the four views by mask matching.

Merging: all detections of the four views, highest score first, are grouped greedily; a detection joins the first
group whose leading mask it overlaps at mask IoU >= ``match_iou`` and that has no member from its view yet. A group
becomes one detection: its mask is the mean of the members' mask probabilities, its box that mask's box, its score
(and DaCSeg ``overlap_score``) the sum over members divided by the four views, so a chromosome seen in one view only
keeps a quarter of its score and survives only if that still reaches the score threshold. The merged detections are
capped at the model's ``detections_per_img`` (``--detections-per-img``), best score first, as without flips.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.ops import box_iou, masks_to_boxes

VIEWS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))  # dims flipped: none, horizontal, vertical, both


def _unflip(output: dict[str, torch.Tensor], dims: tuple[int, ...], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A view's detections in the original image's frame."""
    height, width = size
    boxes = output["boxes"].clone()
    if -1 in dims:
        boxes[:, [0, 2]] = width - output["boxes"][:, [2, 0]]
    if -2 in dims:
        boxes[:, [1, 3]] = height - output["boxes"][:, [3, 1]]
    masks = output["masks"].flip(dims) if dims else output["masks"]
    return {**output, "boxes": boxes, "masks": masks}


def _mask_iou(a: torch.Tensor, b: torch.Tensor, box_a: torch.Tensor, box_b: torch.Tensor) -> float:
    """IoU of two bool ``[H, W]`` masks, counted inside their boxes' union only (the masks lie in their boxes)."""
    x0, y0 = (torch.minimum(box_a[:2], box_b[:2]).floor().clamp(min=0)).int().tolist()
    x1, y1 = torch.maximum(box_a[2:], box_b[2:]).ceil().int().tolist()
    a, b = a[y0:y1 + 1, x0:x1 + 1], b[y0:y1 + 1, x0:x1 + 1]
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def merge_views(views: Sequence[dict[str, torch.Tensor]], score_thresh: float = 0.0, match_iou: float = 0.5,
                mask_thresh: float = 0.5, max_detections: int | None = None) -> dict[str, torch.Tensor]:
    """One output from the views' outputs (already in the original frame; ``masks`` ``[N, 1, H, W]`` probabilities);
    see the module docstring. Groups whose merged score is below ``score_thresh`` are dropped, and only the
    ``max_detections`` best are kept (None: all)."""
    view_of = torch.cat([torch.full((len(v["scores"]),), k) for k, v in enumerate(views)])
    every = {key: torch.cat([v[key] for v in views]) for key in views[0] if key in ("boxes", "labels", "scores",
                                                                                  "masks", "overlap_scores")}
    order = every["scores"].argsort(descending=True)
    binary = every["masks"][:, 0] > mask_thresh
    touching = box_iou(every["boxes"], every["boxes"]) > 0  # only these pairs can share mask pixels
    groups: list[list[int]] = []
    for i in order.tolist():
        for group in groups:
            lead = group[0]
            if (touching[lead, i] and every["labels"][lead] == every["labels"][i]
                    and all(view_of[j] != view_of[i] for j in group)
                    and _mask_iou(binary[lead], binary[i], every["boxes"][lead], every["boxes"][i]) >= match_iou):
                group.append(i)
                break
        else:
            groups.append([i])
    height, width = views[0]["masks"].shape[-2:]
    merged: dict[str, list[torch.Tensor]] = {key: [] for key in every}
    for group in groups:
        index = torch.tensor(group)
        score = every["scores"][index].sum() / len(views)
        if score < score_thresh:
            continue
        mask = every["masks"][index].mean(dim=0)
        merged["scores"].append(score)
        merged["labels"].append(every["labels"][group[0]])
        merged["masks"].append(mask)
        if "overlap_scores" in every:
            merged["overlap_scores"].append(every["overlap_scores"][index].sum() / len(views))
        present = mask[0] > mask_thresh
        merged["boxes"].append(masks_to_boxes(present[None])[0] + torch.tensor([0.0, 0.0, 1.0, 1.0])
                               if present.any() else every["boxes"][group[0]])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, height, width), "overlap_scores": torch.zeros(0)}
    out = {key: torch.stack(values) if values else empty[key] for key, values in merged.items()}
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

    def forward(self, images: Sequence[torch.Tensor], targets=None) -> list[dict[str, torch.Tensor]]:
        if self.training:
            raise RuntimeError("FlipTTA is for inference; train the model itself")
        results = []
        for image in images:
            size = (int(image.shape[-2]), int(image.shape[-1]))
            views = [_unflip(self.model([image.flip(dims) if dims else image])[0], dims, size) for dims in VIEWS]
            results.append(merge_views(views, self.score_thresh, self.match_iou, self.mask_thresh,
                                       self.max_detections))
        return results
