"""``predict.py --export``: the predictions as outlines that annotation tools open and edit, one writer per format.

Every detection is its own outline (``train_utils.outputs.outlines``), so crossing chromosomes overlap in every
format, as in the training data. A detection with several mask pieces is one object made of several polygons; a
detection whose thresholded mask is empty has no outline and is left out.

- ``labelme``: ``labelme/<stem>.json`` per image, in labelme's own layout (``version``, ``flags``, ``shapes``,
  ``imagePath`` relative to the JSON, ``imageData`` null, ``imageHeight``, ``imageWidth``). Each shape is a
  ``polygon`` labelled with the class name; its ``description`` is ``#<number> score=<s>`` (and
  ``overlap_score=<o>`` for DaCSeg), its ``flags`` ``{"review": <score below --review-below>}`` (and
  ``"overlapping"`` for DaCSeg). The pieces of one detection share its number as ``group_id`` (labelme's way of
  grouping shapes, which ``tools/labelme2coco.py`` reads back as one multi-part instance); a detection in one
  piece has none. The files sit in their own folder so that ``tools/labelme2coco.py`` can convert the folder.
- ``imagej``: ``<stem>_rois.zip``, an ImageJ/Fiji ROI set written with ``roifile``: one ROI per detection, named
  by its number, a polygon (a composite ROI for several pieces), with the ROI properties ``class``, ``score``,
  ``review`` and, for DaCSeg, ``overlap_score``.
- ``geojson``: ``<stem>.geojson``, a FeatureCollection QuPath imports as annotation objects: a ``Polygon`` (a
  ``MultiPolygon`` for several pieces) per detection, with the properties ``objectType`` ``annotation``, ``name``
  (the number), ``classification`` ``{"name": <class>}``, ``isLocked`` false, ``review`` and ``measurements``
  ``{"score", "overlap_score" (DaCSeg)}``.
- ``coco``: ``annotations/instances_predicted.json`` and a copy of every image under ``images/``, the dataset
  layout: ``train.py --data-path OUT --train-split predicted`` reads it, CVAT imports it as COCO 1.0 annotations.
  Annotations hold polygons, ``bbox`` and ``area`` as pycocotools computes them, and ``score`` (and
  ``overlap_score``). Image ids are those of ``predictions.json``. Rewritten after every image.

Coordinates are pixels from the image's top-left corner, pixel ``(x, y)`` covering ``[x, x + 1) x [y, y + 1)``.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from train_utils.outputs.files import atomic_write, write_text_atomic
from train_utils.outputs.outlines import Outline

EXPORT_FORMATS = ("labelme", "imagej", "geojson", "coco")
LABELME_DIR = "labelme"
LABELME_VERSION = "5.5.0"
COCO_SPLIT = "predicted"


@dataclass
class ExportImage:
    """The image a prediction belongs to."""

    path: Path
    stem: str  # the output name (``train_utils.jobs.predict.output_stems``)
    image_id: int
    width: int
    height: int


def _xy(ring: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 2), round(float(y), 2)] for x, y in ring]


def _description(outline: Outline) -> str:
    text = f"#{outline.number} score={outline.score:.4f}"
    return text + (f" overlap_score={outline.overlap_score:.4f}" if outline.overlap_score is not None else "")


def labelme_doc(outlines: Sequence[Outline], image: ExportImage, json_dir: Path) -> dict[str, Any]:
    """The labelme JSON of one image whose file is read from ``json_dir`` (see the module docstring)."""
    try:
        image_path = Path(os.path.relpath(Path(image.path).resolve(), Path(json_dir).resolve())).as_posix()
    except ValueError:  # another drive on Windows: no relative path
        image_path = Path(image.path).resolve().as_posix()
    shapes = []
    for outline in outlines:
        flags = {"review": outline.review}
        if outline.overlapping is not None:
            flags["overlapping"] = outline.overlapping
        group = outline.number if len(outline.polygons) > 1 else None
        shapes += [{"label": outline.label, "points": _xy(ring), "group_id": group,
                    "description": _description(outline), "shape_type": "polygon", "flags": dict(flags)}
                   for ring in outline.polygons]
    return {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": image_path, "imageData": None,
            "imageHeight": image.height, "imageWidth": image.width}


def imagej_roi(outline: Outline):
    """The ``roifile.ImagejRoi`` of one detection: a polygon, or a composite ROI for several pieces."""
    from roifile import ROI_TYPE, ImagejRoi

    if len(outline.polygons) == 1:
        roi = ImagejRoi.frompoints(outline.polygons[0].astype(np.float32), name=str(outline.number))
        roi.roitype = ROI_TYPE.POLYGON
    else:  # a shape path: move to the first point, lines to the others, close; per piece
        path = [v for ring in outline.polygons
                for v in (0, *ring[0], *[w for point in ring[1:] for w in (1, *point)], 4)]
        every = np.concatenate(outline.polygons)
        roi = ImagejRoi(roitype=ROI_TYPE.RECT, name=str(outline.number),
                        multi_coordinates=np.asarray(path, dtype=np.float32), shape_roi_size=len(path))
        (roi.left, roi.top), (roi.right, roi.bottom) = np.floor(every.min(0)), np.ceil(every.max(0))
    props = {"class": outline.label, "score": f"{outline.score:.4f}", "review": str(outline.review).lower()}
    if outline.overlap_score is not None:
        props["overlap_score"] = f"{outline.overlap_score:.4f}"
    roi.props = "".join(f"{key}: {value}\n" for key, value in props.items())
    return roi


def write_imagej(path: str | os.PathLike, outlines: Sequence[Outline]) -> Path:
    """``<stem>_rois.zip``: the ROI set (an empty zip without outlines), written atomically."""
    from roifile import roiwrite

    rois = [imagej_roi(outline) for outline in outlines if outline.polygons]
    return atomic_write(path, lambda tmp: roiwrite(tmp, rois, mode="w"))


def _closed(ring: np.ndarray) -> list[list[float]]:
    points = _xy(ring)
    return points + points[:1]


def geojson_doc(outlines: Sequence[Outline]) -> dict[str, Any]:
    """The QuPath GeoJSON FeatureCollection of one image (see the module docstring)."""
    features = []
    for outline in outlines:
        if not outline.polygons:
            continue
        if len(outline.polygons) == 1:
            geometry = {"type": "Polygon", "coordinates": [_closed(outline.polygons[0])]}
        else:
            geometry = {"type": "MultiPolygon", "coordinates": [[_closed(ring)] for ring in outline.polygons]}
        measurements = {"score": round(outline.score, 5)}
        if outline.overlap_score is not None:
            measurements["overlap_score"] = round(outline.overlap_score, 5)
        features.append({"type": "Feature", "geometry": geometry, "properties": {
            "objectType": "annotation", "name": str(outline.number), "classification": {"name": outline.label},
            "isLocked": False, "review": outline.review, "measurements": measurements}})
    return {"type": "FeatureCollection", "features": features}


def coco_annotations(outlines: Sequence[Outline], image: ExportImage, first_id: int) -> list[dict[str, Any]]:
    """COCO annotations (polygons, pycocotools' ``bbox`` and ``area``, ``score``) of one image, ids from
    ``first_id``."""
    annotations = []
    for outline in outlines:
        if not outline.polygons:
            continue
        polygons = [[round(float(v), 2) for v in ring.ravel()] for ring in outline.polygons]
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, image.height, image.width))
        annotation = {"id": first_id + len(annotations), "image_id": image.image_id,
                      "category_id": outline.category_id, "segmentation": polygons,
                      "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
                      "iscrowd": 0, "score": round(outline.score, 5)}
        if outline.overlap_score is not None:
            annotation["overlap_score"] = round(outline.overlap_score, 5)
        annotations.append(annotation)
    return annotations


class CocoExport:
    """``annotations/instances_predicted.json`` and ``images/`` under ``root``, rewritten after every image."""

    def __init__(self, root: str | os.PathLike, label_names: Mapping[int, str],
                 label_to_cat_id: Mapping[int, int]) -> None:
        self.root = Path(root)
        self.path = self.root / "annotations" / f"instances_{COCO_SPLIT}.json"
        self.categories = [{"id": int(label_to_cat_id[k]), "name": label_names[k]} for k in sorted(label_names)]
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.write()

    def add(self, image: ExportImage, outlines: Sequence[Outline]) -> None:
        file_name = f"{image.stem}{Path(image.path).suffix.lower()}"
        atomic_write(self.root / "images" / file_name, lambda tmp: shutil.copyfile(image.path, tmp))
        self.images.append({"id": image.image_id, "file_name": file_name, "width": image.width,
                            "height": image.height})
        self.annotations += coco_annotations(outlines, image, len(self.annotations) + 1)
        self.write()

    def write(self) -> None:
        doc = {"info": {"description": "DaCSeg predictions (predict.py --export coco)"}, "licenses": [],
               "images": self.images, "annotations": self.annotations, "categories": self.categories}
        write_text_atomic(self.path, json.dumps(doc, separators=(",", ":")) + "\n")


def export_paths(output_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Where each per-image format of ``stem`` goes."""
    output_dir = Path(output_dir)
    return {"labelme": output_dir / LABELME_DIR / f"{stem}.json", "imagej": output_dir / f"{stem}_rois.zip",
            "geojson": output_dir / f"{stem}.geojson"}


class Exporter:
    """Writes the chosen ``EXPORT_FORMATS`` into ``output_dir``, image by image."""

    def __init__(self, output_dir: str | os.PathLike, formats: Sequence[str], label_names: Mapping[int, str],
                 label_to_cat_id: Mapping[int, int]) -> None:
        unknown = sorted(set(formats) - set(EXPORT_FORMATS))
        if unknown:
            raise ValueError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(EXPORT_FORMATS)}")
        self.output_dir, self.formats = Path(output_dir), tuple(formats)
        self.coco = CocoExport(self.output_dir, label_names, label_to_cat_id) if "coco" in formats else None

    def add(self, image: ExportImage, outlines: Sequence[Outline]) -> None:
        paths = export_paths(self.output_dir, image.stem)
        if "labelme" in self.formats:
            doc = labelme_doc(outlines, image, paths["labelme"].parent)
            write_text_atomic(paths["labelme"], json.dumps(doc, indent=1) + "\n")
        if "imagej" in self.formats:
            write_imagej(paths["imagej"], outlines)
        if "geojson" in self.formats:
            write_text_atomic(paths["geojson"], json.dumps(geojson_doc(outlines)) + "\n")
        if self.coco is not None:
            self.coco.add(image, outlines)
