"""ResNet-FPN backbones and the weight-loading helpers the detector builder shares."""
from __future__ import annotations

from backbone.resnet_fpn import BACKBONE_BUILDERS, NORM_LAYER_CLASSES, load_backbone_weights, resnet_fpn_backbone
from backbone.weights import LoadReport, WeightsError, read_state_dict

__all__ = [
    "BACKBONE_BUILDERS",
    "NORM_LAYER_CLASSES",
    "LoadReport",
    "WeightsError",
    "load_backbone_weights",
    "read_state_dict",
    "resnet_fpn_backbone",
]
