"""Editable outlines of predicted chromosomes: each detection's mask traced into polygons, with what an annotator
needs to know about it (its number, class, score, and whether to look at it first).

The tracing is marching squares (``contourpy``, matplotlib's contour engine) at level 0.5 of the binary mask. Vertex
coordinates are in COCO's pixel-edge convention, which labelme, ImageJ and QuPath share: pixel ``(x, y)`` covers
``[x, x + 1) x [y, y + 1)``, so a vertex ``(x, y)`` lies on pixel corners or edge midpoints. Points in the middle of
a straight run are dropped; nothing else is simplified, so rasterising the polygons (pycocotools) gives back the
mask's pixels. A mask in several pieces gives one polygon per piece, largest first; pieces smaller than a tenth of
the largest (``MIN_PIECE_FRACTION``) are specks of a thresholded probability map, not chromosome, and are left out,
so an annotator is not handed dozens of one-pixel polygons. Holes are filled, since a labelme or ImageJ polygon has
none. Every detection is traced on its own, so crossing chromosomes keep their overlapping (amodal) outlines.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import contourpy
import numpy as np

from train_utils.masks import as_box_masks

MIN_PIECE_FRACTION = 0.1  # of the largest piece's area: smaller pieces are specks and are left out


def drop_collinear(ring: np.ndarray) -> np.ndarray:
    """The closed ring ``[K, 2]`` (first point not repeated) without the points that lie on the straight line
    between their neighbours."""
    before, after = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    keep = np.abs(turn) > 1e-9
    return ring[keep] if keep.sum() >= 3 else ring


def mask_polygons(mask: np.ndarray, min_piece_fraction: float = MIN_PIECE_FRACTION, *,
                  origin: tuple[int, int] = (0, 0)) -> list[np.ndarray]:
    """Outline polygons of a binary ``[H, W]`` mask: one ``[K, 2]`` float array of ``(x, y)`` vertices (not closed)
    per piece of at least ``min_piece_fraction`` of the largest piece's area, largest first; ``[]`` for an empty
    mask. See the module docstring. ``mask`` covers the image from pixel ``origin`` (x, y) on (a detection's box),
    and the vertices are in the image's coordinates."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return []
    top, left = rows.min(), cols.min()
    window = np.asarray(mask[top:rows.max() + 1, left:cols.max() + 1], dtype=np.float64)
    padded = np.pad(window, 1)  # a closed outline also where the mask touches the window's edge
    generator = contourpy.contour_generator(z=padded, name="serial", fill_type=contourpy.FillType.OuterOffset)
    points, offsets = generator.filled(0.5, 2.0)
    # array index i is pixel centre i - 1 (the padding) of the window, i.e. pixel edge i - 0.5 + the window's corner
    shift = np.array([left + origin[0] - 0.5, top + origin[1] - 0.5])
    rings = [drop_collinear(p[o[0]:o[1] - 1] + shift) for p, o in zip(points, offsets)]  # the outer ring of each
    areas = [abs(polygon_area(ring)) for ring in rings]
    order = sorted(range(len(rings)), key=lambda i: -areas[i])
    return [rings[i] for i in order if areas[i] >= min_piece_fraction * areas[order[0]]]


def polygon_area(ring: np.ndarray) -> float:
    """Signed area (shoelace) of a ``[K, 2]`` ring."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


@dataclass
class Outline:
    """One detection as an editable outline."""

    number: int  # from 1 in score order, as the overlay and the karyotype crops
    label: str  # the class name
    category_id: int
    score: float
    polygons: list[np.ndarray] = field(default_factory=list)  # one [K, 2] per piece, largest first
    overlap_score: float | None = None  # DaCSeg
    overlapping: bool | None = None  # DaCSeg: overlap_score >= the overlap threshold
    review: bool = False  # score below --review-below: the annotator looks at it first


def detection_outlines(output: Mapping[str, Any], label_names: Mapping[int, str],
                       label_to_cat_id: Mapping[int, int], review_below: float = 0.0, overlap_thresh: float = 0.5,
                       mask_thresh: float = 0.5) -> list[Outline]:
    """The outlines of a prediction (``masks`` as ``train_utils.masks.BoxMasks`` or ``[N, 1, H, W]``, bool or
    probabilities), in the output's order, each traced in its box. A detection whose mask is empty has no polygons."""
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    overlap = output.get("overlap_scores")
    overlap = None if overlap is None else overlap.detach().float().cpu().tolist()
    masks = as_box_masks(output["masks"]).cpu().binary(mask_thresh)
    outlines = []
    for k, (score, label) in enumerate(zip(scores, labels)):
        x0, y0 = masks.regions[k, :2].tolist()
        outline = Outline(k + 1, str(label_names.get(int(label), label)), int(label_to_cat_id[int(label)]),
                          float(score), mask_polygons(masks.patches[k].numpy(), origin=(x0, y0)),
                          review=score < review_below)
        if overlap is not None:
            outline.overlap_score, outline.overlapping = float(overlap[k]), overlap[k] >= overlap_thresh
        outlines.append(outline)
    return outlines
