"""The one overlap rule, and that every place that flags overlapping chromosomes uses it."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from overlaps import MIN_OVERLAP_AREA, instance_flags, overlapping_from_rles, segmentation_rle

H, W = 30, 40
ROOT = Path(__file__).resolve().parents[1]


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def three_masks() -> np.ndarray:
    masks = np.zeros((3, H, W), dtype=np.uint8)
    masks[0, 0:10, 0:10] = 1   # meets 1 over 3x10 = 30 px
    masks[1, 0:10, 7:20] = 1
    masks[2, 20:25, 30:34] = 1  # alone
    return masks


def test_overlapping_from_rles_counts_the_union_of_the_others():
    rles = [rle(m) for m in three_masks()]
    assert overlapping_from_rles(rles, 20.0) == [True, True, False]
    assert overlapping_from_rles(rles, 31.0) == [False, False, False]
    assert overlapping_from_rles(rles[:1]) == [False] and overlapping_from_rles([]) == []


def test_the_union_counts_not_each_neighbour_alone():
    masks = np.zeros((3, H, W), dtype=np.uint8)
    masks[0, 10:14, 0:30] = 1      # a bar crossed by two thin ones, 12 px each: 24 px in all
    masks[1, 5:20, 5:8] = 1
    masks[2, 5:20, 20:23] = 1
    assert overlapping_from_rles([rle(m) for m in masks], 20.0) == [True, False, False]


@pytest.mark.parametrize("seed", range(5))
def test_the_rule_equals_counting_pixels(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((10, H, W), dtype=np.uint8)
    for m in masks:
        y, x = rng.integers(0, H - 6), rng.integers(0, W - 6)
        m[y:y + rng.integers(2, 12), x:x + rng.integers(2, 12)] = 1
    coverage = masks.sum(0)
    shared = (masks.astype(bool) & (coverage - masks > 0)).sum((1, 2))
    for min_area in (1, MIN_OVERLAP_AREA, 40):
        assert overlapping_from_rles([rle(m) for m in masks], min_area) == [bool(s >= min_area) for s in shared]


def test_instance_flags_take_an_annotations_own_flag_first():
    rles = [rle(m) for m in three_masks()]
    assert instance_flags([None, None, None], rles) == [True, True, False]
    assert instance_flags([False, None, True], rles) == [False, True, True]
    assert instance_flags([True, False, False], []) == [True, False, False]  # no masks needed when all are given


def uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.r_[0, edges, flat.size])
    counts = ([0] if flat[0] else []) + runs.tolist()
    return {"size": list(mask.shape), "counts": counts}


def test_segmentation_rle_reads_polygons_and_both_rles():
    mask = three_masks()[1]
    for segmentation in (rle(mask), uncompressed(mask), [[7, 0, 20, 0, 20, 10, 7, 10]]):
        decoded = mask_utils.decode(segmentation_rle(segmentation, H, W))
        assert decoded.sum() == 130 and (decoded[:10, 7:20] == 1).all()


def _functions_named(pattern: str) -> list[str]:
    """``file:function`` of every function whose name contains ``pattern`` outside overlaps.py and the tests."""
    found = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or path.parts[-2] == "tests" or path.name == "overlaps.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and pattern in node.name:
                found.append(f"{path.relative_to(ROOT)}:{node.name}")
    return found


def test_no_second_copy_of_the_rule():
    """Flags are computed in overlaps.py only: a function elsewhere that derives them from masks is a second copy
    that could drift (metrics.overlapping_flags reads a COCO index and calls ``instance_flags``)."""
    assert _functions_named("overlapping_from") == []
    assert sorted(_functions_named("overlapping_flags")) == ["train_utils/evaluation/metrics.py:overlapping_flags"]
    defaults = [line for path in ROOT.rglob("*.py") if ".venv" not in path.parts and path.parts[-2] != "tests"
                for line in path.read_text().splitlines() if "overlap_area" in line and "20.0" in line]
    assert defaults == []  # one threshold, MIN_OVERLAP_AREA
