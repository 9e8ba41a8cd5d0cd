"""ResNet-FPN backbones and the weight-loading helpers the detector builder shares."""
from __future__ import annotations

from backbone.resnet_fpn import BACKBONES, NORM_LAYERS, load_backbone_weights, resnet_fpn_backbone
from backbone.weights import LoadReport, WeightsError, read_state_dict

__all__ = [
    "BACKBONES",
    "NORM_LAYERS",
    "LoadReport",
    "WeightsError",
    "load_backbone_weights",
    "read_state_dict",
    "resnet_fpn_backbone",
]
