"""ResNet-FPN backbones composed from torchvision, with optional weights from a local file or a weights name."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from backbone.weights import LoadReport, WeightsError, load_state_dict_report, read_state_dict

BACKBONE_BUILDERS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnext101_32x8d": resnet.resnext101_32x8d,
}
NORM_LAYER_CLASSES: dict[str, Callable[..., nn.Module]] = {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d}
# the ImageNet classifier: a plain ResNet state dict has it, the detector never uses it
_CLASSIFIER = ("fc.",)


def load_backbone_weights(body: resnet.ResNet, source: str | Path, name: str = "backbone") -> LoadReport:
    """Load a plain torchvision ResNet state dict (file or weights name) into ``body``, skipping the classifier."""
    source = str(source)
    state_dict = read_state_dict(source)
    report = load_state_dict_report(body, state_dict, source, ignore=_CLASSIFIER)
    if not report.loaded:
        example = next(iter(state_dict))
        raise WeightsError(f"{source}: no tensor fits a {name} backbone (its keys look like {example!r})")
    return report


def resnet_fpn_backbone(
    name: str = "resnet50",
    norm_layer: str = "bn",
    trainable_layers: int = 5,
    weights_path: str | Path | None = None,
) -> BackboneWithFPN:
    """A ResNet with an FPN on top (256 channels, levels '0'..'3' and 'pool'), as Mask R-CNN expects.

    ``norm_layer`` is ``bn`` or ``frozen_bn``; ``trainable_layers`` (0..5) counts the stages left trainable from the
    last one back (5: all). ``weights_path`` is a local ResNet state dict or a torchvision weights name such as
    ``ResNet50_Weights.IMAGENET1K_V1``; the load report is printed.
    """
    if name not in BACKBONE_BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_BUILDERS)}")
    if norm_layer not in NORM_LAYER_CLASSES:
        raise ValueError(f"unknown norm layer {norm_layer!r}; choose one of {', '.join(NORM_LAYER_CLASSES)}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    body = BACKBONE_BUILDERS[name](weights=None, norm_layer=NORM_LAYER_CLASSES[norm_layer])
    if weights_path is not None:
        report = load_backbone_weights(body, weights_path, name)
        print(f"{name} backbone weights:\n{report}")
    return _resnet_fpn_extractor(body, trainable_layers)
