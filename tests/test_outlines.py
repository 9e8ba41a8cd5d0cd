"""train_utils/outputs/outlines.py: masks traced into polygons that rasterise back to the same pixels, one polygon
per piece, and the outline of each detection with its number, score and flags."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from conftest import bar_polygon
from train_utils.outputs.outlines import detection_outlines, drop_collinear, mask_polygons

H, W = 60, 80


def rasterise(polygons: list[np.ndarray], height: int = H, width: int = W) -> np.ndarray:
    """The pixels pycocotools (the dataset and the converters) gives the polygons."""
    if not polygons:
        return np.zeros((height, width), dtype=bool)
    rles = mask_utils.frPyObjects([p.ravel().tolist() for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def bar_mask(cx: float, cy: float, length: float, width: float, angle: float, size=(W, H)) -> np.ndarray:
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).polygon(bar_polygon(cx, cy, length, width, angle), fill=1)
    return np.asarray(canvas).astype(bool)


@pytest.mark.parametrize("angle", [0, 17, 45, 90, 133, 171])
def test_a_traced_bar_rasterises_back_to_its_pixels(angle):
    mask = bar_mask(40, 30, 50, 9, angle)
    polygons = mask_polygons(mask)
    assert len(polygons) == 1
    assert np.array_equal(rasterise(polygons), mask)
    assert len(polygons[0]) < mask.sum() / 2  # the points along straight runs are dropped
    rows, cols = np.nonzero(mask)
    boxed = mask_polygons(mask[rows.min():, cols.min() - 1:], origin=(cols.min() - 1, rows.min()))  # a box's mask
    assert len(boxed) == 1 and np.array_equal(boxed[0], polygons[0])


def test_a_mask_touching_the_image_edge_is_closed_along_the_edge():
    mask = np.zeros((H, W), dtype=bool)
    mask[0:10, 0:12] = True
    mask[50:60, 70:80] = True
    polygons = mask_polygons(mask)
    assert np.array_equal(rasterise(polygons), mask)
    assert polygons[0].min(axis=0).tolist() == [0.0, 0.0]  # pixel-edge coordinates: the corner of the image
    assert polygons[1].max(axis=0).tolist() == [80.0, 60.0]


def test_pieces_give_one_polygon_each_largest_first_and_holes_are_filled():
    mask = np.zeros((H, W), dtype=bool)
    mask[2:10, 2:10] = True  # 64 px
    mask[20:40, 30:50] = True  # 400 px, with a hole
    mask[30, 40] = False
    polygons = mask_polygons(mask)
    assert len(polygons) == 2
    assert rasterise(polygons[:1]).sum() == 400 and rasterise(polygons[1:]).sum() == 64
    filled = mask.copy()
    filled[30, 40] = True
    assert np.array_equal(rasterise(polygons), filled)
    assert mask_polygons(np.zeros((H, W), dtype=bool)) == []


def test_specks_smaller_than_a_tenth_of_the_largest_piece_are_left_out():
    mask = np.zeros((H, W), dtype=bool)
    mask[20:40, 30:50] = True  # 400 px
    mask[2:8, 2:8] = True  # 36 px: a speck
    mask[50, 5:60:2] = True  # single pixels, as a weak model's thresholded probabilities leave them
    assert len(mask_polygons(mask)) == 1 and rasterise(mask_polygons(mask)).sum() == 400
    assert len(mask_polygons(mask, min_piece_fraction=0.0)) == 2 + 28


def test_drop_collinear_keeps_the_corners():
    square = np.array([[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [1, 2], [0, 2], [0, 1]], dtype=float)
    assert drop_collinear(square).tolist() == [[0, 0], [2, 0], [2, 2], [0, 2]]


def test_detection_outlines_carry_number_class_score_and_flags():
    masks = torch.zeros(3, 1, H, W)
    masks[0, 0] = torch.from_numpy(bar_mask(40, 30, 50, 9, 30)) * 0.9  # probabilities, as --tta and .onnx give
    masks[1, 0] = torch.from_numpy(bar_mask(40, 30, 45, 9, 120)) * 0.8
    masks[2, 0, 5:8, 5:8] = 0.3  # below the mask threshold: no outline
    output = {"scores": torch.tensor([0.9, 0.6, 0.55]), "labels": torch.tensor([1, 2, 1]), "masks": masks,
              "overlap_scores": torch.tensor([0.8, 0.7, 0.1])}
    outlines = detection_outlines(output, {1: "chromosome", 2: "marker"}, {1: 7, 2: 9}, review_below=0.7,
                                  overlap_thresh=0.75, mask_thresh=0.5)
    assert [(o.number, o.label, o.category_id, o.review, o.overlapping) for o in outlines] == [
        (1, "chromosome", 7, False, True), (2, "marker", 9, True, False), (3, "chromosome", 7, True, False)]
    assert outlines[0].score == pytest.approx(0.9) and outlines[1].overlap_score == pytest.approx(0.7)
    assert np.array_equal(rasterise(outlines[0].polygons), bar_mask(40, 30, 50, 9, 30))
    assert outlines[2].polygons == []
    crossing = rasterise(outlines[0].polygons) & rasterise(outlines[1].polygons)
    assert crossing.sum() > 40  # traced one by one: the crossing stays in both
    plain = detection_outlines({k: v for k, v in output.items() if k != "overlap_scores"}, {1: "c", 2: "m"},
                               {1: 1, 2: 2})
    assert all(o.overlap_score is None and o.overlapping is None and not o.review for o in plain)
