"""Instance masks kept at their box size: ``BoxMasks``, what ``inference.detect`` returns and every writer reads.

A detection's mask is zero away from its box, so it is stored as the patch over its region of the image only: the
masks of N detections on an H x W image take the sum of their box areas, not N x H x W. Each writer pastes or encodes
a patch where it needs it (``crop``: one mask over any window of the image, zero outside its region).

``paste_roi_masks`` turns the mask head's ``[N, 1, M, M]`` probabilities into box-sized patches with torchvision's
own ``expand_masks``, ``expand_boxes`` and ``paste_mask_in_image``, called on each box's window instead of on the
whole image, so every pixel is the one ``torchvision.models.detection.roi_heads.paste_masks_in_image`` gives.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_mask_in_image
from torchvision.ops import masks_to_boxes

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels, the ends exclusive


class BoxMasks:
    """N masks of one image of ``size`` (H, W): mask k is ``patches[k]`` (``[y1 - y0, x1 - x0]``, bool or float
    probabilities) placed at ``regions[k]`` = (x0, y0, x1, y1) (``[N, 4]`` int64 on the CPU), and zero elsewhere.

    Indexing with a bool or integer tensor, a list or a slice selects detections, as for the other outputs."""

    def __init__(self, patches: Sequence[torch.Tensor], regions: torch.Tensor | Sequence[Window],
                 size: tuple[int, int]) -> None:
        self.patches = list(patches)
        self.regions = torch.as_tensor(regions, dtype=torch.int64).cpu().reshape(-1, 4)
        self.size = (int(size[0]), int(size[1]))
        if len(self.patches) != len(self.regions):
            raise ValueError(f"BoxMasks: {len(self.patches)} patches but {len(self.regions)} regions")

    def __len__(self) -> int:
        return len(self.patches)

    def __repr__(self) -> str:
        return f"BoxMasks({len(self)} masks of a {self.size[0]}x{self.size[1]} image)"

    def __getitem__(self, index) -> "BoxMasks":
        picked = torch.arange(len(self))[index.cpu() if isinstance(index, torch.Tensor) else index]
        if picked.ndim != 1:
            raise TypeError("BoxMasks: select detections with a sequence, a tensor or a slice; paste(k) gives one mask")
        return BoxMasks([self.patches[i] for i in picked.tolist()], self.regions[picked], self.size)

    @staticmethod
    def cat(parts: Sequence["BoxMasks"]) -> "BoxMasks":
        """The masks of ``parts`` (all of one image size) one after the other."""
        sizes = {part.size for part in parts}
        if len(sizes) != 1:
            raise ValueError(f"BoxMasks.cat: masks of different image sizes {sorted(sizes)}")
        return BoxMasks([p for part in parts for p in part.patches], torch.cat([part.regions for part in parts]),
                        sizes.pop())

    def to(self, device: torch.device | str) -> "BoxMasks":
        return BoxMasks([p.to(device) for p in self.patches], self.regions, self.size)

    def cpu(self) -> "BoxMasks":
        return self.to("cpu")

    def binary(self, thresh: float = 0.5) -> "BoxMasks":
        """Bool masks: probability > ``thresh`` (bool masks are kept as they are)."""
        return BoxMasks([p if p.dtype == torch.bool else p > thresh for p in self.patches], self.regions, self.size)

    def crop(self, k: int, window: Window) -> torch.Tensor:
        """Mask ``k`` over ``window`` of the image: ``[y1 - y0, x1 - x0]``, zero outside its region."""
        x0, y0, x1, y1 = window
        patch = self.patches[k]
        out = torch.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), dtype=patch.dtype, device=patch.device)
        rx0, ry0, rx1, ry1 = self.regions[k].tolist()
        left, top, right, bottom = max(x0, rx0), max(y0, ry0), min(x1, rx1), min(y1, ry1)
        if right > left and bottom > top:
            out[top - y0:bottom - y0, left - x0:right - x0] = patch[top - ry0:bottom - ry0, left - rx0:right - rx0]
        return out

    def paste(self, k: int) -> torch.Tensor:
        """Mask ``k`` at the image's size ``[H, W]``."""
        return self.crop(k, (0, 0, self.size[1], self.size[0]))

    def full(self) -> torch.Tensor:
        """Every mask at the image's size, ``[N, 1, H, W]``: N x H x W values, for small images and tests only."""
        if not self.patches:
            return torch.zeros((0, 1, *self.size), dtype=torch.bool)
        return torch.stack([self.paste(k) for k in range(len(self))])[:, None]

    def flip(self, dims: Sequence[int]) -> "BoxMasks":
        """The masks of the image flipped along ``dims`` (-1: left-right, -2: up-down)."""
        regions = self.regions.clone()
        height, width = self.size
        if -1 in dims:
            regions[:, [0, 2]] = width - self.regions[:, [2, 0]]
        if -2 in dims:
            regions[:, [1, 3]] = height - self.regions[:, [3, 1]]
        return BoxMasks([p.flip(tuple(dims)) if dims else p for p in self.patches], regions, self.size)

    def enlarged(self, scale: int) -> "BoxMasks":
        """The masks of the image enlarged ``scale`` times (nearest neighbour)."""
        if scale == 1:
            return self
        patches = [p.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1) for p in self.patches]
        return BoxMasks(patches, self.regions * scale, (self.size[0] * scale, self.size[1] * scale))

    def tight_boxes(self) -> torch.Tensor:
        """``[N, 4]`` float XYXY of each mask's nonzero pixels as ``torchvision.ops.masks_to_boxes`` gives them (the
        last pixel, not one past it); a zero box for an empty mask."""
        boxes = torch.zeros((len(self), 4))
        for k, patch in enumerate(self.patches):
            if patch.any():
                x0, y0 = self.regions[k, :2].tolist()
                boxes[k] = masks_to_boxes(patch[None].cpu())[0] + torch.tensor([x0, y0, x0, y0])
        return boxes

    @classmethod
    def from_full(cls, masks: torch.Tensor) -> "BoxMasks":
        """Image-sized masks ``[N, H, W]`` or ``[N, 1, H, W]`` (bool, integer or probabilities), each kept over the
        box of its nonzero pixels."""
        masks = masks.as_subclass(torch.Tensor).detach()
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.ndim != 3:
            raise ValueError(f"masks must be [N, H, W] or [N, 1, H, W], got {list(masks.shape)}")
        patches, regions = [], []
        for mask in masks:
            rows, cols = torch.nonzero(mask.any(dim=1)).flatten(), torch.nonzero(mask.any(dim=0)).flatten()
            if len(rows) == 0:
                patches.append(mask[:0, :0].clone())
                regions.append((0, 0, 0, 0))
                continue
            y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            patches.append(mask[y0:y1, x0:x1].clone())  # a copy: a view would keep the whole image's mask alive
            regions.append((x0, y0, x1, y1))
        return cls(patches, regions, (masks.shape[-2], masks.shape[-1]))


def as_box_masks(masks: BoxMasks | torch.Tensor) -> BoxMasks:
    """``masks`` as ``BoxMasks``: as they are, or cut out of image-sized masks (a stand-in model's, an exported
    model's, a dataset's)."""
    return masks if isinstance(masks, BoxMasks) else BoxMasks.from_full(masks)


def paste_roi_masks(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> BoxMasks:
    """The mask head's ``[N, 1, M, M]`` probabilities of ``boxes`` (at ``size``), pasted each into the window of the
    image it covers: exactly the pixels of torchvision's ``paste_masks_in_image`` there, zero elsewhere."""
    height, width = size
    padded, scale = expand_masks(masks, padding=1)
    patches, regions = [], []
    for mask, (b0, b1, b2, b3) in zip(padded, expand_boxes(boxes, scale).to(torch.int64).tolist()):
        x0, y0 = max(b0, 0), max(b1, 0)
        x1, y1 = max(min(b2 + 1, width), x0), max(min(b3 + 1, height), y0)
        if x1 > x0 and y1 > y0:  # torchvision's paste with the box moved into its window and the window as the image
            patches.append(paste_mask_in_image(mask[0], [b0 - x0, b1 - y0, b2 - x0, b3 - y0], y1 - y0, x1 - x0))
        else:
            patches.append(mask.new_zeros((y1 - y0, x1 - x0)))
        regions.append((x0, y0, x1, y1))
    return BoxMasks(patches, regions, size)
