"""DaCSeg RoI heads: overlap classifier, bilayer overlap head and fused mask on top of torchvision's Mask R-CNN.

For every mask RoI the 14x14x256 RoIAlign features F are pooled once and feed three heads::

    F ──▶ overlap classifier ─────────────────────────────────▶ overlapping? [R, 2]
    F ──▶ stage 1 (conv, non-local, 3 conv) = X1 ─▶ overlap mask, overlap boundary      [R, K+1, 28, 28]
    F + X1 ──▶ stage 2 (same, own weights) = X2 ─▶ overlap-else mask, its boundary      [R, K+1, 28, 28]
    F + X2 ──▶ Mask R-CNN mask head + predictor ─▶ final mask                           [R, K+1, 28, 28]

With a shape prior (``ModelConfig.shape_prior``, ``shape_prior``) that mask is the coarse one: the nearest codebook
shapes to it and F + X2 feed a refinement head, whose mask is the final one (the coarse mask keeps its own loss).

``ModelConfig.fusion`` picks what the final mask head reads (F + X2 as published; F + X1; F + p·X2, stage 2 gated by
the classifier's overlap probability p; or F alone), ``crossing_mask_weight`` weighs the final mask loss on the
pixels where a crossing chromosome meets another, and ``neighbour_mask_weight`` on the pixels of the other
chromosomes inside the RoI (where a mask spills into the arm it crosses).

The auxiliary targets are derived from the ground-truth instance masks and their overlap flags (``overlaps``,
given by the dataset as ``target["overlapping"]``; see ``overlap_regions``), so a plain instance-segmentation dataset
is enough to train it.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    maskrcnn_inference,
    maskrcnn_loss,
    paste_masks_in_image,
    project_masks_on_boxes,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import Conv2dNormActivation

from .config import ModelConfig
from .shape_prior import ShapePriorHead, read_codebook

# inference keys of the auxiliary maps, in the order of ``DaCSegLogits`` fields 1..4
OVERLAP_MAP_KEYS = ("overlap_mask", "overlap_edge", "overlap_else_mask", "overlap_else_edge")
# target key of the per-instance overlap flags (``overlaps``; ``my_dataset_chromosome.ChromosomeDataset`` gives them)
OVERLAPPING_KEY = "overlapping"


# ---------------------------------------------------------------------------------------------------------------
# targets and losses


def overlap_regions(masks: Tensor, overlapping: Tensor) -> tuple[Tensor, Tensor]:
    """Split instance masks ``[N, H, W]`` into ``(overlap, overlap_else)``, both bool ``[N, H, W]``.

    ``overlapping`` ``[N]`` says which instances cross another (``overlaps``: the dataset's ``target["overlapping"]``).
    The overlap of such an instance is where it meets any other instance, and its overlap-else the rest of it; both
    are empty for the other instances (their contacts are touching, not crossing).
    """
    masks = masks.bool()
    crossing = overlapping.bool()[:, None, None]
    overlap = masks & (masks.sum(dim=0) > 1) & crossing
    return overlap, masks & ~overlap & crossing


def mask_boundaries(masks: Tensor) -> Tensor:
    """Boundaries of ``[R, M, M]`` masks: 3x3 Laplacian (centre 8, neighbours -1) clamped at 0, > 0.1, as 0/1 floats."""
    kernel = masks.new_full((1, 1, 3, 3), -1.0)
    kernel[0, 0, 1, 1] = 8.0
    laplacian = F.conv2d(masks[:, None], kernel, padding=1)[:, 0]
    return (laplacian.clamp(min=0) > 0.1).to(masks.dtype)


class OverlapTargets(NamedTuple):
    """Targets of the DaCSeg heads for the positive RoIs of a batch (R of them), masks at ``M x M``."""

    labels: Tensor  # [R] int64 ground-truth class of each RoI
    overlapping: Tensor  # [R] int64, 1 where the RoI's ground-truth instance overlaps another
    overlap: Tensor  # [R, M, M]
    overlap_edge: Tensor  # [R, M, M]
    overlap_else: Tensor  # [R, M, M]
    overlap_else_edge: Tensor  # [R, M, M]


def overlap_targets(
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    gt_overlapping: list[Tensor],
    matched_idxs: list[Tensor],
    resolution: int,
) -> OverlapTargets:
    """Derive the overlap targets per image and project them onto the positive proposals like the mask targets;
    each RoI's class target is its ground-truth instance's overlap flag."""
    labels, overlapping, overlap, overlap_else = [], [], [], []
    with torch.autocast(proposals[0].device.type, enabled=False):
        for boxes, masks, classes, flags, idxs in zip(proposals, gt_masks, gt_labels, gt_overlapping, matched_idxs):
            image_overlap, image_overlap_else = overlap_regions(masks, flags)
            boxes = boxes.float()
            labels.append(classes[idxs])
            overlapping.append(flags.long()[idxs])
            overlap.append(project_masks_on_boxes(image_overlap, boxes, idxs, resolution))
            overlap_else.append(project_masks_on_boxes(image_overlap_else, boxes, idxs, resolution))
        overlap_target = torch.cat(overlap)
        overlap_else_target = torch.cat(overlap_else)
        return OverlapTargets(
            labels=torch.cat(labels),
            overlapping=torch.cat(overlapping),
            overlap=overlap_target,
            overlap_edge=mask_boundaries(overlap_target),
            overlap_else=overlap_else_target,
            overlap_else_edge=mask_boundaries(overlap_else_target),
        )


def class_channel_bce(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """BCE with logits on each RoI's ground-truth class channel, mean over RoIs and pixels (0 without RoIs)."""
    if targets.numel() == 0:
        return logits.sum() * 0
    index = torch.arange(labels.shape[0], device=labels.device)
    return F.binary_cross_entropy_with_logits(logits[index, labels], targets)


class DaCSegLogits(NamedTuple):
    """Raw outputs of the DaCSeg heads for R RoIs (the maps are ``[R, K+1, 28, 28]``; None at inference unless the
    auxiliary maps are asked for)."""

    overlap_cls: Tensor  # [R, 2]: not overlapping, overlapping
    overlap: Tensor | None
    overlap_edge: Tensor | None
    overlap_else: Tensor | None
    overlap_else_edge: Tensor | None
    mask: Tensor  # the final mask: the fused one, or its refinement by the shape prior
    coarse_mask: Tensor | None = None  # with a shape prior: the fused mask it refined


def dacseg_loss(logits: DaCSegLogits, targets: OverlapTargets) -> dict[str, Tensor]:
    """The five DaCSeg loss terms (``DACSEG_LOSS_NAMES``); zero, with gradients, when there are no positive RoIs."""
    if targets.overlapping.numel() == 0:
        loss_cls = logits.overlap_cls.sum() * 0
    else:
        loss_cls = F.cross_entropy(logits.overlap_cls, targets.overlapping)
    labels = targets.labels
    return {
        "loss_overlap_cls": loss_cls,
        "loss_overlap": class_channel_bce(logits.overlap, labels, targets.overlap),
        "loss_overlap_edge": class_channel_bce(logits.overlap_edge, labels, targets.overlap_edge),
        "loss_overlap_else": class_channel_bce(logits.overlap_else, labels, targets.overlap_else),
        "loss_overlap_else_edge": class_channel_bce(logits.overlap_else_edge, labels, targets.overlap_else_edge),
    }


def neighbour_regions(masks: Tensor) -> Tensor:
    """``[N, H, W]`` bool: for each instance, the pixels of the other instances outside its own mask (where its mask
    would spill into the chromosome it crosses or touches)."""
    masks = masks.bool()
    others = masks.sum(dim=0, dtype=torch.int32)[None] - masks.int()
    return (others > 0) & ~masks


def weighted_mask_loss(mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                       matched_idxs: list[Tensor], targets: OverlapTargets, crossing_weight: float,
                       neighbour_weight: float) -> Tensor:
    """Mask R-CNN's mask loss (BCE on each RoI's class channel, mean over RoIs and pixels) with the pixels of the
    overlap target, where a crossing chromosome meets another, weighing ``crossing_weight`` instead of 1, and those
    of the other chromosomes inside the RoI (``neighbour_regions``) ``neighbour_weight``."""
    if targets.labels.numel() == 0:
        return mask_logits.sum() * 0
    resolution = mask_logits.shape[-1]
    with torch.autocast(mask_logits.device.type, enabled=False):
        mask_targets = torch.cat([project_masks_on_boxes(m, p.float(), i, resolution)
                                  for m, p, i in zip(gt_masks, proposals, matched_idxs)])
        pixel_weights = 1.0 + (crossing_weight - 1.0) * targets.overlap
        if neighbour_weight != 1.0:
            neighbours = torch.cat([project_masks_on_boxes(neighbour_regions(m), p.float(), i, resolution)
                                    for m, p, i in zip(gt_masks, proposals, matched_idxs)])
            pixel_weights = pixel_weights + (neighbour_weight - 1.0) * neighbours
    index = torch.arange(targets.labels.shape[0], device=mask_logits.device)
    return F.binary_cross_entropy_with_logits(mask_logits[index, targets.labels].float(), mask_targets,
                                              weight=pixel_weights)


# ---------------------------------------------------------------------------------------------------------------
# heads


def overlap_classifier_fc(in_channels: int = 256, resolution: int = 14, hidden: int = 1024) -> nn.Sequential:
    """The published overlap classifier: flatten -> 1024 -> 1024 -> 2 (about 52 M parameters at 256x14x14)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * resolution * resolution, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, 2),
    )


def overlap_classifier_conv(in_channels: int = 256, channels: int = 128) -> nn.Sequential:
    """A light overlap classifier: three 3x3 conv + ReLU (the last two stride 2), global average pooling, linear."""
    return nn.Sequential(
        Conv2dNormActivation(in_channels, channels, 3, norm_layer=None),
        Conv2dNormActivation(channels, channels, 3, stride=2, norm_layer=None),
        Conv2dNormActivation(channels, channels, 3, stride=2, norm_layer=None),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 2),
    )


class NonLocalAttention(nn.Module):
    """Self-attention over the RoI positions: ``x + BN(W_out · V softmax(QᵀK / √C)ᵀ)``, 1x1 conv Q, K, V of C channels."""

    def __init__(self, channels: int, key_channels: int | None = None) -> None:
        super().__init__()
        key_channels = key_channels or channels // 2
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(channels, key_channels, 1)
        self.value = nn.Conv2d(channels, key_channels, 1)
        self.out = nn.Conv2d(key_channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        query, key, value = (conv(x).flatten(2) for conv in (self.query, self.key, self.value))  # [N, C', HW]
        # attention[n, i, j]: how much position i attends to position j
        attention = torch.softmax((query / math.sqrt(query.shape[1])).transpose(1, 2) @ key, dim=-1)
        attended = (value @ attention.transpose(1, 2).to(value.dtype)).reshape(n, value.shape[1], h, w)
        return x + self.norm(self.out(attended))


class OverlapStage(nn.Module):
    """One layer of the bilayer head: 3x3 conv, non-local attention, three 3x3 convs, then two 28x28 predictors."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv_in = MaskRCNNHeads(channels, [channels], dilation=1)
        self.attention = NonLocalAttention(channels)
        self.convs = MaskRCNNHeads(channels, [channels] * 3, dilation=1)
        self.mask_predictor = MaskRCNNPredictor(channels, channels, num_classes)
        self.edge_predictor = MaskRCNNPredictor(channels, channels, num_classes)
        for predictor in (self.mask_predictor, self.edge_predictor):  # start near p = 0.5, as detectron2's mask head
            nn.init.normal_(predictor.mask_fcn_logits.weight, std=0.001)
            nn.init.zeros_(predictor.mask_fcn_logits.bias)

    def forward(self, x: Tensor, with_maps: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Return the stage features and the mask and boundary logits (None without ``with_maps``: at inference the
        fused mask needs only the features)."""
        x = self.convs(self.attention(self.conv_in(x)))
        if not with_maps:
            return x, None, None
        return x, self.mask_predictor(x), self.edge_predictor(x)


class BilayerOverlapHead(nn.Module):
    """Stage 1 on F predicts the overlap region; stage 2 on F + X1 the rest of the instance (overlap-else)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.overlap = OverlapStage(channels, num_classes)
        self.overlap_else = OverlapStage(channels, num_classes)

    def forward(self, features: Tensor, with_maps: bool = True
                ) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
        """Return X1, X2 and the (overlap, overlap edge, overlap-else, overlap-else edge) logits (None each without
        ``with_maps``)."""
        x1, overlap, overlap_edge = self.overlap(features, with_maps)
        x2, overlap_else, overlap_else_edge = self.overlap_else(features + x1, with_maps)
        return x1, x2, (overlap, overlap_edge, overlap_else, overlap_else_edge)


class DaCSegRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` whose mask branch is DaCSeg's: overlap classifier, bilayer head, fused mask.

    Set ``return_overlap_maps = True`` to also return the four auxiliary maps (``OVERLAP_MAP_KEYS``) at inference.
    """

    def __init__(
        self,
        *args: Any,
        overlap_classifier: nn.Module,
        overlap_head: BilayerOverlapHead,
        fusion: str = "stage2",
        crossing_mask_weight: float = 1.0,
        neighbour_mask_weight: float = 1.0,
        shape_prior: ShapePriorHead | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not self.has_mask():
            raise ValueError("DaCSegRoIHeads needs the mask branch (mask_roi_pool, mask_head, mask_predictor)")
        self.overlap_classifier = overlap_classifier
        self.overlap_head = overlap_head
        self.fusion = fusion  # ``ModelConfig.fusion``
        self.crossing_mask_weight = crossing_mask_weight
        self.neighbour_mask_weight = neighbour_mask_weight
        self.shape_prior = shape_prior
        self.return_overlap_maps = False

    @classmethod
    def from_roi_heads(
        cls,
        roi_heads: RoIHeads,
        *,
        overlap_classifier: nn.Module,
        overlap_head: BilayerOverlapHead,
        fusion: str = "stage2",
        crossing_mask_weight: float = 1.0,
        neighbour_mask_weight: float = 1.0,
        shape_prior: ShapePriorHead | None = None,
    ) -> "DaCSegRoIHeads":
        """Take over the modules (shared, not copied) and settings of a torchvision Mask R-CNN ``RoIHeads``."""
        return cls(
            roi_heads.box_roi_pool,
            roi_heads.box_head,
            roi_heads.box_predictor,
            roi_heads.proposal_matcher.high_threshold,
            roi_heads.proposal_matcher.low_threshold,
            roi_heads.fg_bg_sampler.batch_size_per_image,
            roi_heads.fg_bg_sampler.positive_fraction,
            roi_heads.box_coder.weights,
            roi_heads.score_thresh,
            roi_heads.nms_thresh,
            roi_heads.detections_per_img,
            mask_roi_pool=roi_heads.mask_roi_pool,
            mask_head=roi_heads.mask_head,
            mask_predictor=roi_heads.mask_predictor,
            overlap_classifier=overlap_classifier,
            overlap_head=overlap_head,
            fusion=fusion,
            crossing_mask_weight=crossing_mask_weight,
            neighbour_mask_weight=neighbour_mask_weight,
            shape_prior=shape_prior,
        )

    def box_logits(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Class logits and box regression of the box branch (unchanged from Mask R-CNN)."""
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        return self.box_predictor(box_features)

    def dacseg_logits(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
        with_maps: bool = True, labels: list[Tensor] | None = None,
    ) -> DaCSegLogits:
        """Run every DaCSeg head on the mask RoI features of ``boxes``, pooled once (the four auxiliary maps only
        ``with_maps``; they are None otherwise). The shape prior needs each box's class (``labels``, per image)."""
        roi_features = self.mask_roi_pool(features, boxes, image_shapes)
        x1, x2, overlap_maps = self.overlap_head(roi_features, with_maps)
        overlap_cls = self.overlap_classifier(roi_features)
        if self.fusion == "stage2":
            fused = roi_features + x2
        elif self.fusion == "stage1":
            fused = roi_features + x1
        elif self.fusion == "gated":
            fused = roi_features + overlap_cls.float().softmax(dim=1)[:, 1, None, None, None].to(x2.dtype) * x2
        else:
            fused = roi_features
        mask = self.mask_predictor(self.mask_head(fused))
        if self.shape_prior is None:
            return DaCSegLogits(overlap_cls, *overlap_maps, mask)
        if labels is None:
            raise ValueError("a DaCSeg model with a shape prior needs the class of each box (labels)")
        refined = self.shape_prior(fused, mask, torch.cat(labels))
        return DaCSegLogits(overlap_cls, *overlap_maps, refined, coarse_mask=mask)

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return self.detect(features, proposals, image_shapes), {}
        if targets is None:
            raise ValueError("DaCSegRoIHeads needs targets in training mode")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_logits(features, proposals, image_shapes)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)

        positives = [torch.where(image_labels > 0)[0] for image_labels in labels]
        mask_proposals = [p[pos] for p, pos in zip(proposals, positives)]
        pos_matched_idxs = [idxs[pos] for idxs, pos in zip(matched_idxs, positives)]
        roi_labels = [t["labels"][idxs] for t, idxs in zip(targets, pos_matched_idxs)]
        logits = self.dacseg_logits(features, mask_proposals, image_shapes, labels=roi_labels)

        if any(OVERLAPPING_KEY not in t for t in targets):
            raise ValueError(f"DaCSeg training targets need {OVERLAPPING_KEY!r}: a bool per instance, whether it "
                             "crosses another (ChromosomeDataset gives it; see overlaps.py)")
        gt_masks = [t["masks"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        gt_overlapping = [t[OVERLAPPING_KEY] for t in targets]
        targets_overlap = overlap_targets(mask_proposals, gt_masks, gt_labels, gt_overlapping, pos_matched_idxs,
                                          logits.mask.shape[-1])
        losses = {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_mask": maskrcnn_loss(logits.mask, mask_proposals, gt_masks, gt_labels, pos_matched_idxs)
            if self.crossing_mask_weight == self.neighbour_mask_weight == 1.0 else
            weighted_mask_loss(logits.mask, mask_proposals, gt_masks, pos_matched_idxs, targets_overlap,
                               self.crossing_mask_weight, self.neighbour_mask_weight),
        }
        if logits.coarse_mask is not None:
            losses["loss_coarse_mask"] = maskrcnn_loss(logits.coarse_mask, mask_proposals, gt_masks, gt_labels,
                                                       pos_matched_idxs)
        losses.update(dacseg_loss(logits, targets_overlap))
        return [], losses

    def detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Detections with fused ``masks``, ``overlap_scores`` and, when asked, the auxiliary maps (28x28 per box)."""
        class_logits, box_regression = self.box_logits(features, proposals, image_shapes)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        logits = self.dacseg_logits(features, boxes, image_shapes, with_maps=self.return_overlap_maps, labels=labels)
        counts = [b.shape[0] for b in boxes]  # traced as sizes, not constants (an exported graph)
        masks = maskrcnn_inference(logits.mask, labels)
        overlap_scores = logits.overlap_cls.float().softmax(dim=1)[:, 1].split(counts)
        result = [
            {"boxes": b, "labels": lab, "scores": s, "masks": m, "overlap_scores": o}
            for b, lab, s, m, o in zip(boxes, labels, scores, masks, overlap_scores)
        ]
        if self.return_overlap_maps:
            for key, map_logits in zip(OVERLAP_MAP_KEYS, logits[1:5]):
                for detections, probs in zip(result, maskrcnn_inference(map_logits, labels)):
                    detections[key] = probs
        return result


class DaCSegTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` that also pastes the auxiliary overlap maps at the original image size."""

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        result = super().postprocess(result, image_shapes, original_image_sizes)
        if self.training:
            return result
        for detections, size in zip(result, original_image_sizes):
            for key in OVERLAP_MAP_KEYS:
                if key in detections:  # boxes are already at the original size here
                    detections[key] = paste_masks_in_image(detections[key], detections["boxes"], size)
        return result


def convert_to_dacseg(model: MaskRCNN, config: ModelConfig, load_codebook: bool = True) -> MaskRCNN:
    """Turn a torchvision Mask R-CNN into DaCSeg in place and return it.

    Keeps the backbone, RPN, box branch and mask RoIAlign/head/predictor (so Mask R-CNN weights load into it), adds
    the overlap classifier (``config.overlap_cls_head``) and the bilayer head, and swaps the transform for
    ``DaCSegTransform``. (``config.loss_weights`` are applied by the training step, ``train_utils.engine.loop``.)
    With ``config.shape_prior`` it adds the shape prior head, reading the codebook file when ``load_codebook`` (not
    when a checkpoint's state dict, which holds the codebook, is loaded next).
    """
    roi_heads = model.roi_heads
    if isinstance(roi_heads, DaCSegRoIHeads):
        raise ValueError("model is already a DaCSeg model")
    if roi_heads.mask_predictor is None or roi_heads.mask_roi_pool is None:
        raise ValueError("convert_to_dacseg needs a Mask R-CNN model (with a mask branch)")
    num_classes = config.num_classes + 1  # with background, as torchvision counts
    if roi_heads.box_predictor.cls_score.out_features != num_classes:
        raise ValueError(
            f"model has {roi_heads.box_predictor.cls_score.out_features - 1} classes but config.num_classes is "
            f"{config.num_classes}"
        )
    channels = roi_heads.mask_predictor.conv5_mask.in_channels
    resolution = roi_heads.mask_roi_pool.output_size[0]
    if config.overlap_cls_head == "fc":
        classifier = overlap_classifier_fc(channels, resolution)
    else:
        classifier = overlap_classifier_conv(channels)
    device = roi_heads.mask_predictor.conv5_mask.weight.device
    shape_prior = None
    if config.shape_prior is not None:
        shape_prior = ShapePriorHead(channels, num_classes, config.shape_prior_nearest, resolution)
        if load_codebook:
            shape_prior.load_codebook(read_codebook(config.shape_prior, config.num_classes), config.shape_prior)
        shape_prior = shape_prior.to(device)
    model.roi_heads = DaCSegRoIHeads.from_roi_heads(
        roi_heads,
        overlap_classifier=classifier.to(device),
        overlap_head=BilayerOverlapHead(channels, num_classes).to(device),
        fusion=config.fusion,
        crossing_mask_weight=config.crossing_mask_weight,
        neighbour_mask_weight=config.neighbour_mask_weight,
        shape_prior=shape_prior,
    )
    transform = model.transform
    model.transform = DaCSegTransform(
        transform.min_size,
        transform.max_size,
        transform.image_mean,
        transform.image_std,
        size_divisible=transform.size_divisible,
        fixed_size=transform.fixed_size,
        _skip_resize=transform._skip_resize,
    )
    return model
