from __future__ import annotations

import numpy as np
import pytest
import torch

from train_utils.outputs import visualize
from train_utils.outputs.visualize import (
    OVERLAP_COLOR,
    PALETTE,
    draw_instances,
    instance_colors,
    overlap_outline,
    place_labels,
)

H, W = 64, 80


def crossing_masks() -> torch.Tensor:
    """Two crossing bars on the left and a free bar on the right."""
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[0, 28:36, 5:45] = True
    masks[1, 10:55, 20:28] = True
    masks[2, 10:50, 65:72] = True
    return masks


def rgb(picture) -> np.ndarray:
    return np.asarray(picture.convert("RGB")).astype(int)


def test_masks_take_distinct_instance_colours_and_keep_size():
    masks = crossing_masks()
    image = torch.zeros(3, H, W)
    picture = draw_instances(image, masks, alpha=1.0, min_side=0)
    assert picture.size == (W, H) and picture.mode == "RGB"
    pixels = rgb(picture)
    colours = [tuple(pixels[r, c]) for r, c in ((30, 8), (50, 24), (30, 68))]  # one pixel inside each mask only
    assert len(set(colours)) == 3
    assert all(c in PALETTE for c in colours)
    assert tuple(pixels[2, 2]) == (0, 0, 0)  # background untouched


def test_a_crossing_shows_both_colours_and_the_image_not_black():
    masks = crossing_masks()
    image = torch.full((3, H, W), 0.4)
    pixels = rgb(draw_instances(image, masks, alpha=0.5, min_side=0))
    colors = np.array([pixels[30, 8], pixels[50, 24]])  # each bar alone: half its colour, half the grey
    # where the bars cross: half the grey and half the two colours' mean (torchvision alone paints it black)
    assert np.abs(pixels[31, 24] - colors.mean(axis=0)).max() <= 1
    assert pixels[31, 24].max() > 102  # brighter than the grey's half, 51, by a wide margin


def test_overlapping_instances_get_the_outline_and_others_do_not():
    masks = crossing_masks()
    overlapping = torch.tensor([True, True, False])
    pixels = rgb(draw_instances(torch.zeros(3, H, W), masks, overlapping=overlapping, min_side=0))
    outline = np.all(pixels == OVERLAP_COLOR, axis=-1)
    assert outline[27, 5:45].any() and outline[36, 5:45].any()  # just outside bar 0, above and below
    assert outline[10:55, 19].any()  # just left of bar 1
    assert not outline[:, 60:].any()  # the free bar has none
    assert not outline[28:36, 5:15].any()  # the inside (away from the crossing) keeps its own colour
    plain = rgb(draw_instances(torch.zeros(3, H, W), masks, min_side=0))
    assert not np.all(plain == OVERLAP_COLOR, axis=-1).any()


def test_boxes_and_captions_are_drawn():
    masks = crossing_masks()
    boxes = torch.tensor([[5.0, 28, 44, 35], [20, 10, 27, 54], [65, 10, 71, 49]])
    image = torch.zeros(3, H, W)
    with_boxes = rgb(draw_instances(image, masks, boxes=boxes, min_side=0))
    assert tuple(with_boxes[49, 71]) in PALETTE  # a box corner outside the mask's fill blend
    with_captions = rgb(draw_instances(image, masks, boxes=boxes, captions=["a", "b", "0.97"], min_side=0))
    assert (with_captions != with_boxes).any()


def covers(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_labels_of_crowded_boxes_do_not_cover_each_other():
    """Four boxes sharing a top-left corner region (a crowded spread): at one fixed corner their labels would stack;
    placed, no two cover each other and every label stays inside the image."""
    boxes = torch.tensor([[20.0, 20, 60, 70], [22, 21, 58, 66], [24, 19, 70, 60], [21, 23, 40, 80]])
    sizes = [(30, 12)] * 4
    corners = place_labels(boxes, sizes, (100, 100))
    assert corners[0] == (20, 20)  # the first keeps the usual spot, inside the top-left corner
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
    assert not any(covers(rects[i], rects[j]) for i in range(4) for j in range(i))
    assert all(0 <= r[0] and 0 <= r[1] and r[2] <= 100 and r[3] <= 100 for r in rects)
    # a box at the image's edge: its label is moved inside the image
    assert place_labels(torch.tensor([[95.0, 95, 100, 100]]), [(30, 12)], (100, 100)) == [(70, 88)]
    assert len(place_labels(torch.zeros(0, 4), [], (100, 100))) == 0


def test_a_caption_is_not_hidden_by_a_neighbour_s():
    """Two chromosomes whose boxes share a top-left corner: the first caption shows as fully as when drawn alone
    (counted in pixels of its exact colour: the masks are blended, so only labels have it)."""
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 20:50, 10:40] = True
    masks[1, 21:52, 12:42] = True
    captions = ["1: 0.9", "2: 0.8"]
    both = rgb(draw_instances(torch.zeros(3, H, W), masks, captions=captions, min_side=0))
    alone = rgb(draw_instances(torch.zeros(3, H, W), masks[:1], captions=captions[:1], min_side=0))
    first = PALETTE[0]  # the first instance's colour, in both pictures (instance_colors is greedy, in order)
    label_pixels = np.all(alone == first, axis=-1).sum()
    assert label_pixels > 50 and np.all(both == first, axis=-1).sum() == label_pixels


def test_no_instances_and_grey_uint8_input():
    grey = torch.full((1, H, W), 7, dtype=torch.uint8)
    picture = draw_instances(grey, torch.zeros(0, H, W, dtype=torch.bool), boxes=torch.zeros(0, 4), captions=[],
                             overlapping=torch.zeros(0, dtype=torch.bool), min_side=0)
    assert (rgb(picture) == 7).all()
    assert draw_instances(torch.rand(H, W), torch.zeros(0, H, W, dtype=torch.bool), min_side=0).size == (W, H)


def test_float_probability_masks_and_out_of_range_floats_are_accepted():
    masks = crossing_masks()[:, None].float() * 0.9  # [N, 1, H, W] probabilities, as models return
    picture = draw_instances(torch.full((3, H, W), 1.5), masks, alpha=1.0, min_side=0)
    assert tuple(rgb(picture)[30, 68]) in PALETTE
    assert tuple(rgb(picture)[2, 2]) == (255, 255, 255)  # clamped, not wrapped around


def test_small_images_are_enlarged_and_title_adds_a_strip():
    masks = crossing_masks()
    picture = draw_instances(torch.zeros(3, H, W), masks, min_side=256, alpha=1.0)
    assert picture.size == (4 * W, 4 * H)
    assert tuple(rgb(picture)[4 * 30, 4 * 68]) in PALETTE
    titled = draw_instances(torch.zeros(3, H, W), masks, overlapping=torch.tensor([True, True, False]),
                            title="x.png: 3", min_side=256)
    assert titled.width == 4 * W and titled.height > 4 * H
    strip = rgb(titled)[: titled.height - 4 * H]
    assert np.all(strip == OVERLAP_COLOR, axis=-1).any()  # the legend swatch


def test_neighbours_never_share_a_colour():
    torch.manual_seed(0)
    xy = torch.rand(46, 2) * 500
    boxes = torch.cat([xy, xy + 30], dim=1)
    colours = instance_colors(boxes, margin=5)
    grown = boxes + torch.tensor([-5, -5, 5, 5])
    for i in range(46):
        for j in range(i):
            touching = not (grown[i, 0] > grown[j, 2] or grown[j, 0] > grown[i, 2]
                            or grown[i, 1] > grown[j, 3] or grown[j, 1] > grown[i, 3])
            if touching:
                assert colours[i] != colours[j]


def test_outline_is_outside_the_mask():
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 5:15, 5:15] = True
    ring = overlap_outline(mask, radius=2)[0]
    assert ring.sum() == 14 * 14 - 10 * 10
    assert not (ring & mask[0]).any()


def test_mismatched_lengths_name_the_argument():
    with pytest.raises(ValueError, match="captions"):
        draw_instances(torch.zeros(3, H, W), crossing_masks(), captions=["only one"])


def test_dataset_tv_tensors_are_accepted():
    from torchvision import tv_tensors

    masks = tv_tensors.Mask(crossing_masks().to(torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[5, 28, 44, 35], [20, 10, 27, 54], [65, 10, 71, 49]], format="XYXY",
                                     canvas_size=(H, W))
    picture = draw_instances(tv_tensors.Image(torch.zeros(3, H, W)), masks, boxes, ["1", "2", "3"],
                             torch.tensor([True, True, False]), alpha=1.0, min_side=0)
    assert tuple(rgb(picture)[45, 68]) in PALETTE


def test_box_masks_draw_the_pixels_of_one_full_size_call(monkeypatch):
    """Masks at their box size, pasted a band of rows at a time (bands of 5 rows here, some reaching no mask), give
    the picture of one band with every mask at the image's size (off the crossing: one ``draw_segmentation_masks``
    call), and the same outline."""
    from torchvision.utils import draw_segmentation_masks

    from train_utils.masks import BoxMasks
    from train_utils.outputs import visualize

    torch.manual_seed(0)
    image = torch.rand(3, H, W)  # blending rounds differently on every grey level
    masks = crossing_masks()
    boxed = BoxMasks.from_full(masks)
    canvas = visualize._to_uint8_rgb(image)
    colors = instance_colors(boxed.tight_boxes(), margin=max(H, W) / 40)
    want = visualize.paint_masks(canvas.clone(), boxed, colors, 0.45)  # one band: the whole image
    free = masks.sum(dim=0) < 2  # away from the crossing, torchvision's own blend
    assert torch.equal(want[:, free], draw_segmentation_masks(canvas, masks, alpha=0.45, colors=colors)[:, free])
    real_bands = visualize.row_bands
    monkeypatch.setattr(visualize, "row_bands", lambda height, bytes_per_row: real_bands(height, bytes_per_row,
                                                                                         budget=5 * bytes_per_row))
    assert np.array_equal(rgb(draw_instances(image, boxed, min_side=0)), want.permute(1, 2, 0).numpy())
    dilated = torch.nn.functional.max_pool2d(masks[:, None].float(), 7, stride=1, padding=3)[:, 0] > 0
    assert torch.equal(overlap_outline(boxed, radius=3)[0], (dilated & ~masks).any(dim=0))


@pytest.mark.parametrize("font_file", ["shipped", "missing"])
def test_the_label_font_has_the_asked_size_with_or_without_the_shipped_font(font_file, tmp_path, monkeypatch):
    if font_file == "missing":
        monkeypatch.setattr(visualize, "FONT_PATH", tmp_path / "no_font.ttf")
    small, large = visualize.label_font(10), visualize.label_font(30)
    assert large.getbbox("X")[3] > 2 * small.getbbox("X")[3]
