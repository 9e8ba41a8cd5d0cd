"""Running a model on images: the one inference path of evaluation (training, ``validation.py``) and ``predict.py``.

``detect`` takes the steps of torchvision's ``GeneralizedRCNN.forward`` in eval mode, but pastes each mask only
into its box's window of the image (``train_utils.masks``, the same pixels as torchvision's pasting) and thresholds
it, so the masks of N detections take the sum of their box areas, not N times the image.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import torch
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import resize_boxes

from errors import UserError
from network_files.config import ModelConfig
from network_files.dacseg import OVERLAP_MAP_KEYS
from train_utils.inference.openvino_modules import openvino_forwards, use_openvino
from train_utils.masks import as_box_masks, paste_roi_masks

LEVERS = ("bf16", "channels_last", "no_upscale", "openvino")


@dataclass(frozen=True)
class Speedups:
    """Inference levers (``bench/bench_infer.py`` measures each): ``bf16`` runs the backbone (ResNet and FPN, most
    of the work) under bfloat16 autocast, fast on CPUs with AVX-512 BF16 or AMX, while the RPN and the heads stay in
    float32; ``channels_last`` stores the backbone's activations NHWC; ``no_upscale`` runs an image that already
    fits the model's size range at its own size instead of enlarging it to ``min_size``; ``openvino`` runs the
    backbone, the RPN head and the mask head with OpenVINO in float32 on the CPU (``inference.openvino_modules``;
    it takes plain NCHW arrays, so it drops ``channels_last``)."""

    bf16: bool = False
    channels_last: bool = False
    no_upscale: bool = False
    openvino: bool = False

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "Speedups":
        unknown = set(names) - set(LEVERS)
        if unknown:
            raise UserError(f"unknown inference lever(s) {', '.join(sorted(unknown))}; choose from {', '.join(LEVERS)}")
        return cls(**{name: True for name in names})


def default_speedups(config: ModelConfig, on_cpu: bool) -> Speedups:
    """``predict.py``'s levers before its flags: channels-last on the CPU for Mask R-CNN (measured exact and 7 %
    faster); none for DaCSeg, where channels-last moved one of 276 masks to IoU 0.69 for a 2 % gain (README: Speed
    on a CPU workstation)."""
    return Speedups(channels_last=on_cpu and config.name != "dacseg")


def apply_speedups(model: torch.nn.Module, speedups: Speedups) -> torch.nn.Module:
    """Set ``model``'s inference levers (all off with ``Speedups()``) and return it; ``detect`` reads them. A model
    whose modules OpenVINO cannot run here keeps PyTorch's, and ``model.speedups.openvino`` says False."""
    if isinstance(model, GeneralizedRCNN):
        if speedups.openvino and speedups.bf16:
            raise UserError("--openvino runs float32; it does not combine with --bf16")
        if speedups.openvino and model.training:
            raise ValueError("OpenVINO runs a model in eval mode; call model.eval() first")
        openvino = speedups.openvino and use_openvino(model)
        speedups = replace(speedups, openvino=openvino, channels_last=speedups.channels_last and not openvino)
        model.to(memory_format=torch.channels_last if speedups.channels_last else torch.contiguous_format)
    model.speedups = speedups
    return model


def prepare_model(model: torch.nn.Module, config: ModelConfig, score_thresh: float, overlap_maps: bool = False) -> None:
    """Let the model return exactly the detections scoring at least ``score_thresh`` (so nothing below it is ever
    pasted) and, for DaCSeg, the auxiliary maps when asked."""
    if overlap_maps and config.name != "dacseg":
        raise UserError(f"overlap maps need a DaCSeg checkpoint; this one holds a {config.name} model")
    heads = getattr(model, "roi_heads", model)  # an exported model (inference.exported) filters by itself
    heads.score_thresh = float(score_thresh)
    if config.name == "dacseg" and hasattr(heads, "return_overlap_maps"):
        heads.return_overlap_maps = overlap_maps


@torch.inference_mode()
def detect(model: torch.nn.Module, images: Sequence[torch.Tensor], mask_thresh: float | None = 0.5
           ) -> list[dict[str, Any]]:
    """Run the (eval-mode) model on ``[3, H, W]`` images on its device; per image its detections at the image's own
    size: ``boxes``, ``labels``, ``scores``, ``masks`` as ``train_utils.masks.BoxMasks`` (bool: probability >
    ``mask_thresh``; the probabilities themselves with None) and, for DaCSeg, ``overlap_scores`` and the asked-for
    overlap maps ``[H, W]`` (the maximum over detections).

    A torchvision ``GeneralizedRCNN`` (Mask R-CNN, DaCSeg, stock torchvision) is run step by step with box-sized
    pasting; any other model (``FlipTTA``, which merges its four views itself, an exported model, a stand-in) is
    called as it is and must return torchvision's inference outputs, its masks as ``BoxMasks`` or at the image
    size."""
    if not isinstance(model, GeneralizedRCNN):
        outputs = model(list(images))
        for output in outputs:
            if "masks" in output:
                masks = as_box_masks(output["masks"])
                output["masks"] = masks if mask_thresh is None else masks.binary(mask_thresh)
        return outputs
    speedups = getattr(model, "speedups", None) or Speedups()
    if speedups.no_upscale and len(images) > 1:  # the native scale is each image's own
        return [output for image in images for output in detect(model, [image], mask_thresh)]
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    backends = openvino_forwards(model) if speedups.openvino else contextlib.nullcontext()
    with _native_scale(model.transform, sizes, speedups.no_upscale), backends:
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
        outputs.append(paste_detections(found, size, mask_thresh))
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


def paste_detections(detections: Mapping[str, torch.Tensor], size: tuple[int, int],
                     mask_thresh: float | None = 0.5) -> dict[str, Any]:
    """Paste ``[N, 1, M, M]`` RoI masks (boxes already at ``size``) each into its box's window: ``masks`` becomes
    ``BoxMasks`` (bool: probability > ``mask_thresh``; probabilities with None), each overlap map ``[H, W]`` the
    maximum over the N detections."""
    out = dict(detections)
    boxes = detections["boxes"]
    if "masks" in detections:
        masks = paste_roi_masks(detections["masks"], boxes, size)
        out["masks"] = masks if mask_thresh is None else masks.binary(mask_thresh)
    for key in OVERLAP_MAP_KEYS:
        if key in detections:
            best = torch.zeros(size, device=boxes.device)
            pasted = paste_roi_masks(detections[key], boxes, size)
            for patch, (x0, y0, x1, y1) in zip(pasted.patches, pasted.regions.tolist()):
                window = best[y0:y1, x0:x1]
                torch.maximum(window, patch, out=window)
            out[key] = best
    return out
