"""train_utils/masks.py: masks kept at their box size, pasted exactly as torchvision pastes them at the image's size."""
from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import masks_to_boxes

from train_utils.masks import BoxMasks, as_box_masks, paste_roi_masks

H, W = 48, 64
# inside, along every edge, in a corner, a sliver, a box wider than the image, a box touching the far corner
BOXES = torch.tensor([[5.0, 20, 39, 25], [18, 5, 23, 44], [50, 10, 55, 39], [0, 0, 63, 47], [30, 30, 31, 31],
                      [63.5, 47, 64, 48], [0, 0, 0.2, 0.3], [60.2, 1.3, 64, 47.9], [-3, 10, 70, 12.5]])


def roi_masks() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(len(BOXES), 1, 28, 28)


def test_pasted_box_masks_are_torchvisions_full_paste_exactly():
    rois = roi_masks()
    full = paste_masks_in_image(rois, BOXES, (H, W))
    masks = paste_roi_masks(rois, BOXES, (H, W))
    assert len(masks) == len(BOXES) and masks.size == (H, W)
    assert torch.equal(masks.full(), full)  # the probabilities themselves, not only after thresholding
    assert torch.equal(masks.binary(0.5).full(), full > 0.5)
    for patch, (x0, y0, x1, y1) in zip(masks.patches, masks.regions.tolist()):
        assert patch.shape == (y1 - y0, x1 - x0) and 0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H
    box_area = ((BOXES[:, 2] - BOXES[:, 0] + 3) * (BOXES[:, 3] - BOXES[:, 1] + 3)).sum()  # the box and its padding
    assert sum(p.numel() for p in masks.patches) <= box_area < len(BOXES) * H * W / 4
    assert paste_roi_masks(rois[:0], BOXES[:0], (H, W)).full().shape == (0, 1, H, W)


def test_image_sized_masks_are_cut_to_their_pixels_and_pasted_back():
    full = paste_masks_in_image(roi_masks(), BOXES, (H, W)) > 0.5
    full[2] = False  # an empty mask
    masks = as_box_masks(full)
    assert torch.equal(masks.full(), full) and masks.regions[2].tolist() == [0, 0, 0, 0]
    assert as_box_masks(masks) is masks
    present = full[:, 0].flatten(1).any(dim=1)
    boxes = masks.tight_boxes()
    assert torch.equal(boxes[present], masks_to_boxes(full[present, 0])) and not boxes[2].any()
    with pytest.raises(ValueError, match=r"masks must be \[N, H, W\]"):
        as_box_masks(torch.zeros(H, W))


def test_flips_enlargement_selection_and_windows_act_as_on_the_image():
    probabilities = paste_roi_masks(roi_masks(), BOXES, (H, W))
    full = probabilities.full()
    for dims in ((-1,), (-2,), (-2, -1)):
        assert torch.equal(probabilities.flip(dims).full(), full.flip(dims))
    enlarged = probabilities.enlarged(3).full()[:, 0]
    assert torch.equal(enlarged, full[:, 0].repeat_interleave(3, dim=1).repeat_interleave(3, dim=2))
    keep = torch.tensor([True, False, True, False, True, False, True, False, True])
    assert torch.equal(probabilities[keep].full(), full[keep]) and torch.equal(probabilities[2:5].full(), full[2:5])
    assert torch.equal(probabilities[torch.tensor([4, 0])].full(), full[[4, 0]])
    both = BoxMasks.cat([probabilities[:3], probabilities[3:]])
    assert torch.equal(both.full(), full) and torch.equal(both.regions, probabilities.regions)
    assert torch.equal(probabilities.crop(3, (10, 5, 70, 20)), torch.nn.functional.pad(full[3, 0, 5:20, 10:], (0, 6)))
    assert torch.equal(probabilities.cpu().full(), full)
    with pytest.raises(TypeError, match="paste"):
        probabilities[0]
    with pytest.raises(ValueError, match="image sizes"):
        BoxMasks.cat([probabilities, probabilities.enlarged(2)])
