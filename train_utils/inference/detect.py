"""Running a model on images: the one inference path of evaluation (training, ``validation.py``) and ``predict.py``.

``detect`` takes the steps of torchvision's ``GeneralizedRCNN.forward`` in eval mode, but pastes the masks itself a
few at a time and thresholds them, so a large image with many detections fits in memory.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from errors import UserError
from network_files.config import ModelConfig
from network_files.dacseg import OVERLAP_MAP_KEYS

PASTE_BYTES = 256 * 2**20  # float memory for pasting masks at once; an image then needs ~N bytes per pixel on top
LEVERS = ("bf16", "channels_last", "no_upscale")


@dataclass(frozen=True)
class Speedups:
    """Inference levers (``bench/bench_infer.py`` measures each): ``bf16`` runs the backbone (ResNet and FPN, most
    of the work) under bfloat16 autocast, fast on CPUs with AVX-512 BF16 or AMX, while the RPN and the heads stay in
    float32; ``channels_last`` stores the backbone's activations NHWC; ``no_upscale`` runs an image that already
    fits the model's size range at its own size instead of enlarging it to ``min_size``."""

    bf16: bool = False
    channels_last: bool = False
    no_upscale: bool = False

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "Speedups":
        unknown = set(names) - set(LEVERS)
        if unknown:
            raise UserError(f"unknown inference lever(s) {', '.join(sorted(unknown))}; choose from {', '.join(LEVERS)}")
        return cls(**{name: True for name in names})


def apply_speedups(model: torch.nn.Module, speedups: Speedups) -> torch.nn.Module:
    """Set ``model``'s inference levers (all off with ``Speedups()``) and return it; ``detect`` reads them."""
    if isinstance(model, GeneralizedRCNN):
        model.to(memory_format=torch.channels_last if speedups.channels_last else torch.contiguous_format)
    model.speedups = speedups
    return model


def prepare_model(model: torch.nn.Module, config: ModelConfig, score_thresh: float, overlap_maps: bool = False) -> None:
    """Let the model return exactly the detections scoring at least ``score_thresh`` (so nothing below it is ever
    pasted at full size) and, for DaCSeg, the auxiliary maps when asked."""
    if overlap_maps and config.name != "dacseg":
        raise UserError(f"overlap maps need a DaCSeg checkpoint; this one holds a {config.name} model")
    heads = getattr(model, "roi_heads", model)  # an exported model (inference.exported) filters by itself
    heads.score_thresh = float(score_thresh)
    if config.name == "dacseg" and hasattr(heads, "return_overlap_maps"):
        heads.return_overlap_maps = overlap_maps


@torch.inference_mode()
def detect(model: torch.nn.Module, images: Sequence[torch.Tensor], mask_thresh: float = 0.5,
           paste_bytes: int = PASTE_BYTES) -> list[dict[str, torch.Tensor]]:
    """Run the (eval-mode) model on ``[3, H, W]`` images on its device; per image its detections at the image's own
    size: ``boxes``, ``labels``, ``scores``, ``masks`` ``[N, 1, H, W]`` bool (probability > ``mask_thresh``) and,
    for DaCSeg, ``overlap_scores`` and the asked-for overlap maps ``[H, W]`` (the maximum over detections).

    A torchvision ``GeneralizedRCNN`` (Mask R-CNN, DaCSeg, stock torchvision) is run step by step with bounded
    pasting; any other model (``FlipTTA``, which merges its four views itself, or a stand-in) is called as it is
    and must return torchvision's inference outputs at the image size."""
    if not isinstance(model, GeneralizedRCNN):
        outputs = model(list(images))
        for output in outputs:
            output["masks"] = output["masks"] > mask_thresh
        return outputs
    speedups = getattr(model, "speedups", None) or Speedups()
    if speedups.no_upscale and len(images) > 1:  # the native scale is each image's own
        return [output for image in images for output in detect(model, [image], mask_thresh, paste_bytes)]
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    with _native_scale(model.transform, sizes, speedups.no_upscale):
        batch, _ = model.transform(list(images))
        tensors = batch.tensors.to(memory_format=torch.channels_last) if speedups.channels_last else batch.tensors
        if speedups.bf16:  # only the backbone; without it the caller's autocast (evaluation under --amp) holds
            with torch.autocast(tensors.device.type, dtype=torch.bfloat16):
                features = model.backbone(tensors)
            features = OrderedDict((name, level.float()) for name, level in features.items())
        else:
            features = model.backbone(tensors)
        proposals, _ = model.rpn(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    outputs = []
    for found, resized, size in zip(detections, batch.image_sizes, sizes):
        found = {k: v.float() if v.is_floating_point() else v for k, v in found.items()}
        found["boxes"] = resize_boxes(found["boxes"], resized, size)
        outputs.append(paste_detections(found, size, mask_thresh, paste_bytes))
    return outputs


@contextlib.contextmanager
def _native_scale(transform, sizes: Sequence[tuple[int, int]], enabled: bool) -> Iterator[None]:
    """With ``enabled``, lower the transform's ``min_size`` to the image's shorter side for the call, so an image
    already inside the size range is not enlarged (a larger one is still brought down to ``max_size``)."""
    saved = transform.min_size
    if enabled:
        transform.min_size = (min(saved[-1], *(min(size) for size in sizes)),)
    try:
        yield
    finally:
        transform.min_size = saved


def paste_detections(
    detections: Mapping[str, torch.Tensor], size: tuple[int, int], mask_thresh: float = 0.5,
    paste_bytes: int = PASTE_BYTES,
) -> dict[str, torch.Tensor]:
    """Paste ``[N, 1, M, M]`` RoI masks (boxes already at ``size``) a few at a time, within ``paste_bytes`` of float:
    ``masks`` becomes ``[N, 1, H, W]`` bool (probability > ``mask_thresh``), each overlap map ``[H, W]`` max over N."""
    out = dict(detections)
    boxes = detections["boxes"]
    chunk = max(1, paste_bytes // (4 * size[0] * size[1]))
    pieces = [slice(i, i + chunk) for i in range(0, len(boxes), chunk)]
    if "masks" in detections:
        masks = detections["masks"]
        out["masks"] = torch.empty((len(boxes), 1, *size), dtype=torch.bool, device=masks.device)
        for p in pieces:  # filled in place: a list of pieces and their concatenation would hold every mask twice
            out["masks"][p] = paste_masks_in_image(masks[p], boxes[p], size) > mask_thresh
    for key in OVERLAP_MAP_KEYS:
        if key in detections:
            best = torch.zeros(size, device=boxes.device)
            for p in pieces:
                best = torch.maximum(best, paste_masks_in_image(detections[key][p], boxes[p], size)[:, 0].amax(dim=0))
            out[key] = best
    return out
