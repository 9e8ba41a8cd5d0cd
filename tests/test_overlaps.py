"""The one overlap rule, and that every place that flags overlapping chromosomes uses it."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from overlaps import (MIN_OVERLAP_AREA, crossing_clusters, crossing_pairs, instance_flags, overlapping_from_rles,
                      segmentation_rle)

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


def _library_sources() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text())) for path in ROOT.rglob("*.py")
            if ".venv" not in path.parts and path.parts[-2] != "tests" and path.name != "overlaps.py"]


def test_no_second_copy_of_the_rule():
    """Overlap flags are derived in overlaps.py only: elsewhere nothing intersects masks with the union of the
    others (pycocotools' ``merge(..., intersect=True)``), no function is named like the rule, and no threshold
    default is a number of its own instead of ``MIN_OVERLAP_AREA``."""
    copies, own_thresholds = [], []
    for path, tree in _library_sources():
        where = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "intersect":
                copies.append(f"{where}:{node.lineno} intersects masks")
            if isinstance(node, ast.FunctionDef) and "overlapping_from" in node.name:
                copies.append(f"{where}:{node.lineno} {node.name}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if "overlap_area" in arg.arg and isinstance(default, ast.Constant):
                        own_thresholds.append(f"{where}:{node.lineno} {arg.arg}={default.value}")
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and "overlap_area" in node.target.id and isinstance(node.value, ast.Constant):
                own_thresholds.append(f"{where}:{node.lineno} {node.target.id}={node.value.value}")
    assert copies == [] and own_thresholds == []


def test_crossing_pairs_are_the_pairs_sharing_at_least_the_threshold():
    masks = three_masks()  # 0 and 1 share 30 px; 2 is alone
    rles = [rle(m) for m in masks]
    assert crossing_pairs(rles) == [(0, 1)]
    assert crossing_pairs(rles, min_area=31) == []


def test_crossing_clusters_are_connected_components_of_two_or_more():
    assert crossing_clusters(6, [(0, 1), (1, 4), (2, 5)]) == [[0, 1, 4], [2, 5]]
    assert crossing_clusters(3, []) == []
