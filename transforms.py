"""Named augmentation presets for chromosome instance segmentation, on ``torchvision.transforms.v2``.

``get_transform(preset, train, invert_prob=0.0)`` returns a callable ``(image, target) -> (image, target)`` for the
samples of ``my_dataset_chromosome.ChromosomeDataset``:

* ``none``: no augmentation.
* ``hflip``: random horizontal flip (the seeds' behaviour).
* ``flip``: random horizontal and vertical flips (the reference setup and the training default).
* ``chromosome``: chromosomes have no canonical orientation or polarity: horizontal and vertical flips, a random
  multiple of 90 degrees, a small free rotation with scale jitter (zoom 0.85..1.15 inside the same canvas, out-of-image
  corners filled with 0), mild Gaussian blur, brightness / contrast / gamma and mild noise; the image stays in 0..1.

``invert_prob`` (any training preset) inverts grey levels with that probability, turning Q-band (bright on dark) into
a G-band look-alike (dark on white) and back; 0 disables it.

No preset resizes the image for the model; the model's own transform does that. Flips move boxes exactly, so the
flip-only presets keep the dataset's boxes and areas. After rotations and scaling (``chromosome``) the boxes are
recomputed as the tight box of each mask (pixel-edge convention, as the dataset does), ``area`` becomes
the mask's pixel count, and instances whose mask became empty are dropped together with their ``labels``,
``area``, ``iscrowd`` and ``overlapping`` entries. With ``train=False`` the transform only makes sure of the dtypes
(float32 image in 0..1, uint8 masks, float32 boxes).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from my_dataset_chromosome import boxes_from_masks

PRESETS = ("none", "hflip", "flip", "chromosome")
PER_INSTANCE_KEYS = ("boxes", "masks", "labels", "area", "iscrowd", "overlapping")


class RandomGamma(v2.Transform):
    """Gamma correction with a gamma drawn uniformly from ``gamma_range`` (images only)."""

    def __init__(self, gamma_range: tuple[float, float] = (0.7, 1.4)) -> None:
        super().__init__()
        self.gamma_range = gamma_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.gamma_range
        return {"gamma": float(torch.empty(1).uniform_(low, high))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Image):
            return F.adjust_gamma(inpt, params["gamma"])
        return inpt


def tighten_instances(image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Recompute boxes and areas from the masks, drop the instances whose mask became empty, and clear the
    ``overlapping`` flag of an instance that no longer meets any other (its crossing was cut away)."""
    target = dict(target)
    masks = target["masks"]
    keep = masks.flatten(1).amax(1) > 0  # amax: many times faster than any() / sum() on uint8 masks
    for key in PER_INSTANCE_KEYS:
        if key in target and key not in ("boxes", "masks"):
            target[key] = target[key][keep]
    masks = tv_tensors.wrap(masks[keep], like=masks)
    target["masks"] = masks
    if "overlapping" in target:  # a crop can take an instance's crossing away; the flag must not outlive it
        meets = (masks.bool() & (masks.sum(0, dtype=torch.int32) > 1)).flatten(1).any(1)
        target["overlapping"] = target["overlapping"] & meets
    target["boxes"] = tv_tensors.BoundingBoxes(boxes_from_masks(masks), format="XYXY",
                                               canvas_size=tuple(masks.shape[-2:]))
    if "area" in target:
        target["area"] = masks.sum(2, dtype=torch.int32).sum(1).to(torch.float32)
    return image, target


def _dtypes() -> v2.Transform:
    return v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.uint8,
                       tv_tensors.BoundingBoxes: torch.float32, "others": None}, scale=True)


def _quarter_turns() -> v2.Transform:
    return v2.RandomChoice([v2.RandomRotation((angle, angle), expand=True) for angle in (0, 90, 180, 270)])


def get_transform(preset: str, train: bool, *, invert_prob: float = 0.0, crop_size: int | None = None) -> Callable:
    """The ``(image, target)`` transform of a preset (see the module docstring); ``train=False`` only fixes dtypes.

    ``crop_size`` (training only) cuts a random ``crop_size`` square (padded with 0 where the image is smaller) at the
    original scale before the preset; boxes are then the tight boxes of the cut masks and instances cut away entirely
    are dropped.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not 0.0 <= invert_prob <= 1.0:
        raise ValueError(f"invert_prob must be in 0..1, got {invert_prob}")
    if not train:
        return v2.Compose([v2.ToImage(), _dtypes()])

    geometric: list[Callable] = [] if crop_size is None else [v2.RandomCrop(crop_size, pad_if_needed=True)]
    photometric: list[Callable] = []
    if preset in ("hflip", "flip", "chromosome"):
        geometric.append(v2.RandomHorizontalFlip(0.5))
    if preset in ("flip", "chromosome"):
        geometric.append(v2.RandomVerticalFlip(0.5))
    if preset == "chromosome":
        geometric += [
            _quarter_turns(),
            v2.RandomApply([v2.RandomAffine(degrees=10.0, scale=(0.85, 1.15))], p=0.5),
        ]
        # blur first: ColorJitter then clamps to 0..1, and gamma, clipped noise and inversion keep it there
        photometric += [
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.0))], p=0.2),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
            v2.RandomApply([RandomGamma((0.7, 1.4))], p=0.5),
            v2.RandomApply([v2.GaussianNoise(sigma=0.02)], p=0.2),
        ]
    if invert_prob > 0:
        photometric.append(v2.RandomInvert(invert_prob))
    steps: list[Callable] = [v2.ToImage(), _dtypes(), *geometric]
    if preset == "chromosome" or crop_size is not None:  # flips are exact on boxes; crops, rotation, scaling not
        steps.append(tighten_instances)
    return v2.Compose(steps + photometric)
