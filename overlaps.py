"""The overlap rule: which chromosomes cross another. Torch-free (numpy and pycocotools), so the generator, the
converters, the dataset and the metrics all import this one definition.

An instance *overlaps* when its mask meets the union of the other instances of its image over at least
``MIN_OVERLAP_AREA`` pixels at the original image scale; a smaller contact is touching, not crossing. An
annotation's own ``"overlapping"`` flag, where it has one, is taken as given. The dataset hands these flags to the
model as ``target["overlapping"]``, so DaCSeg's overlap targets follow the same rule (``network_files.dacseg``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

MIN_OVERLAP_AREA = 20.0  # px^2 at the original image scale


def overlapping_from_rles(rles: Sequence[dict[str, Any]], min_area: float = MIN_OVERLAP_AREA) -> list[bool]:
    """Per instance (a pycocotools RLE of one image each): whether it meets the union of the others over at least
    ``min_area`` pixels. Only instances whose boxes touch are merged, so it costs little on a crowded image."""
    if len(rles) < 2:
        return [False] * len(rles)
    touching = _touching_boxes(rles)
    flags = []
    for i, rle in enumerate(rles):
        near = np.flatnonzero(touching[i])
        if len(near) == 0:
            flags.append(False)
            continue
        others = mask_utils.merge([rles[j] for j in near])
        shared = mask_utils.merge([rle, others], intersect=True)
        flags.append(bool(mask_utils.area(shared) >= min_area))
    return flags


def _touching_boxes(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """``[N, N]`` bool: the boxes of instances ``i`` and ``j`` (``i != j``) overlap, so their masks may."""
    boxes = mask_utils.toBbox(list(rles)).reshape(-1, 4)
    low, high = boxes[:, :2], boxes[:, :2] + boxes[:, 2:]
    touching = (low[:, None] < high[None]).all(axis=2) & (high[:, None] > low[None]).all(axis=2)
    np.fill_diagonal(touching, False)
    return touching


def instance_flags(given: Sequence[bool | None], rles: Sequence[dict[str, Any]],
                   min_area: float = MIN_OVERLAP_AREA) -> list[bool]:
    """The flags of one image's instances: each annotation's own flag (``given``; None where it has none), else
    derived from the masks by ``overlapping_from_rles``."""
    if None not in given:
        return [bool(flag) for flag in given]
    derived = overlapping_from_rles(rles, min_area)
    return [derived[k] if flag is None else bool(flag) for k, flag in enumerate(given)]


def segmentation_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as one compressed RLE: the masks the rule
    compares (the dataset checks an annotation before it converts it with this)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def crossing_pairs(rles: Sequence[dict[str, Any]], min_area: float = MIN_OVERLAP_AREA) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j``, of one image's instances whose masks share at least ``min_area`` pixels: the
    chromosomes that cross each other (``overlapping_from_rles`` flags an instance against the union of all others)."""
    if len(rles) < 2:
        return []
    pairs = []
    for i, j in zip(*np.nonzero(np.triu(_touching_boxes(rles)))):
        shared = mask_utils.merge([rles[i], rles[j]], intersect=True)
        if mask_utils.area(shared) >= min_area:
            pairs.append((int(i), int(j)))
    return pairs


def crossing_clusters(num_instances: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components of "crosses" (``pairs``) with at least two members, each sorted, ordered by first member."""
    parent = list(range(num_instances))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i, j in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for k in range(num_instances):
        members.setdefault(root(k), []).append(k)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])
