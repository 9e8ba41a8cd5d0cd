"""Build Mask R-CNN / DaCSeg from a ``ModelConfig`` and load COCO detector weights into it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator

from backbone import LoadReport, WeightsError, read_state_dict, resnet_fpn_backbone
from backbone.weights import load_state_dict_report
from network_files.config import ModelConfig
from network_files.dacseg import convert_to_dacseg

ANCHOR_ASPECT_RATIOS = (0.5, 1.0, 2.0)
# modules whose shape depends on the number of classes (torchvision's predictors, and DaCSeg's overlap predictors,
# which are MaskRCNNPredictors too): dropped when a checkpoint was trained for another class count
CLASS_SPECIFIC_MODULES = ("cls_score", "bbox_pred", "mask_fcn_logits")
_CLS_SCORE = "roi_heads.box_predictor.cls_score.weight"


def is_class_specific(key: str) -> bool:
    """Whether a state-dict key belongs to a class-count-dependent predictor of the RoI heads (not the RPN's)."""
    module = key.rsplit(".", 1)[0]
    return module.startswith("roi_heads.") and module.rsplit(".", 1)[-1] in CLASS_SPECIFIC_MODULES


def resolve_config(config: ModelConfig, pretrained: bool) -> ModelConfig:
    """Fill the automatic fields, as torchvision does for ``maskrcnn_resnet50_fpn``.

    ``trainable_layers`` None -> 3 with pretrained weights, 5 from scratch; ``norm_layer`` None -> ``frozen_bn``
    with pretrained weights, ``bn`` from scratch. Set fields are kept. Returns a new config.
    """
    trainable_layers = config.trainable_layers
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5
    norm_layer = config.norm_layer
    if norm_layer is None:
        norm_layer = "frozen_bn" if pretrained else "bn"
    return dataclasses.replace(config, trainable_layers=trainable_layers, norm_layer=norm_layer)


def build_model(config: ModelConfig, pretrained_backbone: str | Path | None = None,
                load_codebook: bool = True) -> MaskRCNN:
    """A torchvision ``MaskRCNN`` (DaCSeg heads when ``config.name == "dacseg"``) with ``num_classes + 1`` classes.

    ``pretrained_backbone`` is a local ResNet state dict or a torchvision weights name. Automatic config fields are
    resolved with ``pretrained = pretrained_backbone is not None``; callers that load detector weights afterwards
    should pass ``resolve_config(config, pretrained=True)``. ``load_codebook=False`` leaves ``config.shape_prior``'s
    file unread, for a checkpoint's state dict (which holds the codebook) to fill.
    """
    config = resolve_config(config, pretrained=pretrained_backbone is not None)
    backbone = resnet_fpn_backbone(config.backbone, config.norm_layer, config.trainable_layers, pretrained_backbone)
    anchor_generator = AnchorGenerator(
        sizes=tuple((size,) for size in config.anchor_sizes),
        aspect_ratios=(ANCHOR_ASPECT_RATIOS,) * len(config.anchor_sizes),
    )
    model = MaskRCNN(
        backbone,
        num_classes=config.num_classes + 1,
        min_size=config.min_size,
        max_size=config.max_size,
        rpn_anchor_generator=anchor_generator,
        box_score_thresh=config.box_score_thresh,
        box_nms_thresh=config.box_nms_thresh,
        box_detections_per_img=config.box_detections_per_img,
        box_batch_size_per_image=config.rois_per_image,
    )
    if config.name == "dacseg":
        model = convert_to_dacseg(model, config, load_codebook)
    return model


def load_detector_weights(model: MaskRCNN, source: str | Path) -> LoadReport:
    """Load a (COCO) Mask R-CNN state dict, file or torchvision weights name, into ``model`` non-strictly.

    Class-specific predictor tensors whose shape differs (another class count) are dropped and named in the report;
    modules the source lacks (DaCSeg's new heads) are reported as starting fresh. Other shape mismatches and a
    source that fits nothing raise ``WeightsError``.
    """
    source = str(source)
    state_dict = read_state_dict(source)
    own = model.state_dict()
    dropped = [
        key
        for key, tensor in state_dict.items()
        if is_class_specific(key) and key in own and own[key].shape != tensor.shape
    ]
    reason = "class-specific predictors, class count differs"
    if _CLS_SCORE in dropped:
        reason = (
            f"class-specific predictors: {state_dict[_CLS_SCORE].shape[0]} classes in the source, "
            f"{own[_CLS_SCORE].shape[0]} in the model, background included"
        )
    for key in dropped:
        del state_dict[key]
    report = load_state_dict_report(model, state_dict, source)
    if not report.loaded:
        example = next(iter(state_dict), "nothing")
        raise WeightsError(f"{source}: no tensor fits a Mask R-CNN model (its keys look like {example!r})")
    if dropped:
        report.dropped, report.dropped_reason = dropped, reason
        report.missing = [key for key in report.missing if key not in dropped]
    return report
