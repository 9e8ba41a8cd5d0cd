"""The model configuration: everything needed to rebuild a model, stored in every checkpoint."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from backbone.resnet_fpn import BACKBONE_BUILDERS, NORM_LAYER_CLASSES
from overlaps import MIN_OVERLAP_AREA

MODEL_NAMES = ("maskrcnn", "dacseg")
BACKBONE_NAMES = tuple(BACKBONE_BUILDERS)  # the names backbone/ can build
NORM_LAYERS = tuple(NORM_LAYER_CLASSES)
OVERLAP_CLS_HEADS = ("fc", "conv")
# what DaCSeg's final mask head sees: F + X2 (stage 2's features, the published fusion), F + X1, F + p * X2 (X2 gated
# by the overlap classifier's probability p), or F alone (the overlap heads then act through their losses only)
FUSIONS = ("stage2", "stage1", "gated", "none")
MASKRCNN_LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
DACSEG_LOSS_NAMES = (
    "loss_overlap_cls",
    "loss_overlap",
    "loss_overlap_edge",
    "loss_overlap_else",
    "loss_overlap_else_edge",
)
# with a shape prior, ``loss_mask`` is the refined (final) mask's and the coarse mask keeps its own term
SHAPE_PRIOR_LOSS_NAMES = ("loss_coarse_mask",)
LOSS_NAMES = MASKRCNN_LOSS_NAMES + DACSEG_LOSS_NAMES + SHAPE_PRIOR_LOSS_NAMES


class ReadOnlyDict(dict):
    """A dict that refuses changes (a frozen config's mapping field); it still pickles and deep-copies."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a ModelConfig is read-only; dataclasses.replace(config, loss_weights=...) makes a changed copy")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return type(self), (dict(self),)


@dataclass(frozen=True)
class ModelConfig:
    """A model is fully described by this; ``network_files.build_model(config)`` rebuilds it. Frozen: decided once,
    then read (``dataclasses.replace`` makes a changed copy)."""

    name: str = "maskrcnn"
    num_classes: int = 1  # without background
    backbone: str = "resnet50"
    # None: 3 with pretrained weights, 5 (all) when training from scratch (torchvision's rule)
    trainable_layers: Optional[int] = None
    # None: frozen_bn with pretrained weights, bn when training from scratch (torchvision's rule)
    norm_layer: Optional[str] = None
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    rois_per_image: int = 512  # RoIs sampled per training image for the box and mask losses (torchvision's 512)
    # the overlap rule's threshold (``overlaps``, px^2 at the original image scale): decides the DaCSeg targets
    # (through the dataset's flags) and the overlap subsets of the evaluation
    min_overlap_area: float = MIN_OVERLAP_AREA
    # DaCSeg only
    overlap_cls_head: str = "fc"
    fusion: str = "stage2"
    # the final mask loss's weight on the pixels where a crossing chromosome meets another (1: plain Mask R-CNN loss)
    crossing_mask_weight: float = 1.0
    # its weight on the pixels of the other chromosomes inside the RoI (where a mask spills into the arm it crosses)
    neighbour_mask_weight: float = 1.0
    # a shape codebook file (tools/build_shape_codebook.py): the final mask is refined with the shapes nearest to the
    # coarse mask (network_files/shape_prior.py); the codebook itself travels in the state dict
    shape_prior: Optional[str] = None
    shape_prior_nearest: int = 2  # codebook shapes given to each RoI
    loss_weights: Mapping[str, float] = field(default_factory=dict)  # read-only once built

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor_sizes", tuple(int(s) for s in self.anchor_sizes))
        object.__setattr__(self, "loss_weights", ReadOnlyDict(self.loss_weights))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with one clear line for an impossible configuration."""
        if self.name not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.name!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.backbone not in BACKBONE_NAMES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONE_NAMES)}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1 (background not counted), got {self.num_classes}")
        if self.trainable_layers is not None and not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {self.trainable_layers}")
        if self.norm_layer is not None and self.norm_layer not in NORM_LAYERS:
            raise ValueError(f"unknown norm layer {self.norm_layer!r}; choose one of {', '.join(NORM_LAYERS)}")
        if self.min_size < 32 or self.max_size < self.min_size:
            raise ValueError(f"need 32 <= min_size <= max_size, got min_size={self.min_size} max_size={self.max_size}")
        if not 0.0 <= self.min_overlap_area < float("inf"):
            raise ValueError(f"min_overlap_area must be a finite number >= 0, got {self.min_overlap_area}")
        if self.rois_per_image < 1:
            raise ValueError(f"rois_per_image must be at least 1, got {self.rois_per_image}")
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5), got {list(self.anchor_sizes)}")
        if self.overlap_cls_head not in OVERLAP_CLS_HEADS:
            raise ValueError(
                f"unknown overlap classifier head {self.overlap_cls_head!r}; choose one of {', '.join(OVERLAP_CLS_HEADS)}"
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown DaCSeg fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if not 0.0 <= self.crossing_mask_weight < float("inf"):
            raise ValueError(f"crossing_mask_weight must be a finite number >= 0, got {self.crossing_mask_weight}")
        if not 0.0 <= self.neighbour_mask_weight < float("inf"):
            raise ValueError(f"neighbour_mask_weight must be a finite number >= 0, got {self.neighbour_mask_weight}")
        if self.shape_prior is not None and self.name != "dacseg":
            raise ValueError("a shape prior (--shape-prior) needs --model dacseg")
        if self.shape_prior_nearest < 1:
            raise ValueError(f"shape_prior_nearest must be at least 1, got {self.shape_prior_nearest}")
        known = (MASKRCNN_LOSS_NAMES + (DACSEG_LOSS_NAMES if self.name == "dacseg" else ())
                 + (SHAPE_PRIOR_LOSS_NAMES if self.shape_prior is not None else ()))
        unknown = sorted(set(self.loss_weights) - set(known))
        if unknown:
            only_dacseg = " (DaCSeg's terms need --model dacseg)" if set(unknown) & set(DACSEG_LOSS_NAMES) else ""
            if set(unknown) & set(SHAPE_PRIOR_LOSS_NAMES):
                only_dacseg = " (loss_coarse_mask needs --shape-prior)"
            raise ValueError(f"no loss term named {', '.join(unknown)} in a {self.name} model{only_dacseg}; "
                             f"known: {', '.join(known)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/``weights_only``-safe dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["anchor_sizes"] = list(self.anchor_sizes)
        d["loss_weights"] = dict(self.loss_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of ``to_dict``; unknown keys are an error that names them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"model config has unknown key(s): {', '.join(sorted(unknown))}")
        return cls(**d)
