"""Convert CVAT "for images 1.1" XML polygons or a Pascal VOC instance layout into the project's COCO layout.

    python tools/xml2coco.py INPUT --out OUT_DIR [--split NAME] [--labels a,b,...] [--images DIR]

INPUT is either
* a CVAT XML file (``<annotations>`` with ``<image name= width= height=>`` elements holding ``<polygon label=
  points="x,y;x,y;...">``); images are looked up as ``name`` (then its base name) under ``--images`` (default: the
  XML's folder). Polygons sharing a ``group_id`` and label become one multi-part instance; other shape kinds (box,
  polyline, points, mask, ...) are skipped and counted; or
* a Pascal VOC root with ``Annotations/*.xml``, ``SegmentationObject/<stem>.png`` (pixel value k = the k-th
  ``<object>``, 255 = void) and ``JPEGImages/``. When ``ImageSets/Segmentation/<split>.txt`` exists only its ids are
  converted, otherwise every annotation that has a SegmentationObject PNG; the others are counted as skipped.
  Instances are stored as RLE.

Output, image naming, categories, ``bbox`` / ``area`` and the ``"overlapping"`` flag are as in
``tools/labelme2coco.py``.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from lxml import etree  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402
from tqdm import tqdm  # noqa: E402

from my_dataset_chromosome import DatasetError  # noqa: E402
from overlaps import MIN_OVERLAP_AREA  # noqa: E402
from tools.coco_layout import rle_from_mask  # noqa: E402
from tools.labelme2coco import CocoBuilder, ConversionSummary, parse_labels  # noqa: E402
from errors import DaCSegError, one_line, print_error  # noqa: E402
from train_utils.cli import ArgumentParser, add_min_overlap_area_arg  # noqa: E402


def parse_xml(path: Path) -> etree._ElementTree:
    """Parse an XML file safely (no entities, no network); DatasetError naming the file."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    try:
        return etree.parse(str(path), parser)
    except etree.XMLSyntaxError as exc:
        raise DatasetError(f"malformed XML in {path}: {one_line(exc)}") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {one_line(exc)}") from None


def _int_attr(element: etree._Element, name: str, source: str) -> int:
    try:
        return int(float(element.get(name)))
    except (TypeError, ValueError):
        raise DatasetError(f"{source}: <{element.tag}> line {element.sourceline} needs a numeric {name!r}") from None


def _cvat_points(text: str | None, source: str, line: int) -> list[float]:
    pairs = [pair.split(",") for pair in (text or "").split(";") if pair.strip()]
    try:
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError
        return [float(v) for pair in pairs for v in pair]
    except ValueError:
        raise DatasetError(f"{source}: polygon at line {line} has malformed points {text!r}") from None


def _find_image(name: str, images_dir: Path, source: str) -> Path:
    for candidate in (images_dir / name, images_dir / Path(name).name):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{source}: image {name!r} not found under {images_dir}")


def add_cvat_file(builder: CocoBuilder, xml_path: Path, images_dir: Path) -> None:
    """Add every ``<image>`` of a CVAT for-images XML and its polygons to ``builder``."""
    root = parse_xml(xml_path).getroot()
    if root.tag != "annotations":
        raise DatasetError(f"{xml_path} is not a CVAT for-images XML (root <{root.tag}>, expected <annotations>)")
    source = xml_path.name
    for element in tqdm(root.iter("image"), desc="xml2coco (CVAT)", unit="image", disable=None):
        name = element.get("name")
        if not name:
            raise DatasetError(f"{xml_path}: <image> at line {element.sourceline} has no name")
        where = f"{source}:{name}"
        image_path = _find_image(name, images_dir, str(xml_path))
        image = builder.add_image(image_path.read_bytes(), Path(name).stem, str(image_path), image_path.suffix,
                                  expected_size=(_int_attr(element, "width", str(xml_path)),
                                                 _int_attr(element, "height", str(xml_path))))
        groups: dict[tuple[str, Any], list[list[float]]] = defaultdict(list)
        for k, shape in enumerate(element):
            if not isinstance(shape.tag, str) or shape.tag == "tag":
                continue  # comments, image-level tags
            if shape.tag != "polygon":
                builder.skip(f"shape <{shape.tag}> is not a polygon", where)
                continue
            label = shape.get("label", "")
            if not builder.accepts_label(label, where):
                continue
            group = shape.get("group_id")
            key = (label, ("group", group) if group not in (None, "", "0") else ("shape", k))
            groups[key].append(_cvat_points(shape.get("points"), str(xml_path), shape.sourceline))
        instances = []
        for (label, _), polygons in groups.items():
            segmentation, rle = builder.polygon_rle(polygons, image, where)
            if rle is not None:
                instances.append((label, segmentation, rle))
        builder.add_instances(image, instances)


def _voc_ids(voc_root: Path, split: str) -> list[str]:
    listing = voc_root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if listing.is_file():
        return [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    return sorted(p.stem for p in (voc_root / "Annotations").glob("*.xml"))


def _read_object_map(path: Path) -> np.ndarray:
    """VOC SegmentationObject PNG as its raw indices (palette indices, not colours)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DatasetError(f"{path}: a SegmentationObject PNG must hold palette or grey indices, "
                                   f"got mode {img.mode}")
            return np.array(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"cannot read {path}: {one_line(exc)}") from None


def add_voc_image(builder: CocoBuilder, voc_root: Path, image_id: str) -> None:
    """Add one VOC image with its object masks to ``builder`` (skipped and counted when it has no object PNG)."""
    xml_path = voc_root / "Annotations" / f"{image_id}.xml"
    object_png = voc_root / "SegmentationObject" / f"{image_id}.png"
    if not xml_path.is_file():
        raise DatasetError(f"{voc_root}: image id {image_id!r} has no {xml_path.relative_to(voc_root)}")
    if not object_png.is_file():
        builder.skip("image without a SegmentationObject PNG", image_id)
        return
    root = parse_xml(xml_path).getroot()
    file_name = root.findtext("filename") or f"{image_id}.jpg"
    image_path = voc_root / "JPEGImages" / file_name
    if not image_path.is_file():
        raise DatasetError(f"{xml_path}: image {image_path} not found")
    size = root.find("size")
    expected = (None, None)
    if size is not None and size.findtext("width") and size.findtext("height"):
        expected = (int(size.findtext("width")), int(size.findtext("height")))
    image = builder.add_image(image_path.read_bytes(), Path(file_name).stem, str(image_path), image_path.suffix,
                              expected_size=expected)
    object_map = _read_object_map(object_png)
    if object_map.shape != (image["height"], image["width"]):
        raise DatasetError(f"{object_png} is {object_map.shape[1]}x{object_map.shape[0]} but its image is "
                           f"{image['width']}x{image['height']}")
    instances = []
    for k, obj in enumerate(root.iter("object"), start=1):
        label = (obj.findtext("name") or "").strip()
        if not builder.accepts_label(label, image_id):
            continue
        mask = object_map == k
        if not mask.any():
            builder.skip("object with an empty mask", image_id)
            continue
        rle = rle_from_mask(mask)
        instances.append((label, rle, {**rle, "counts": rle["counts"].encode("ascii")}))
    builder.add_instances(image, instances)


def convert_xml(input_path: str | Path, out_dir: str | Path, split: str = "train", labels: list[str] | None = None,
                images_dir: str | Path | None = None, min_overlap_area: float = MIN_OVERLAP_AREA) -> ConversionSummary:
    """Convert a CVAT XML file or a VOC root into ``out_dir``'s COCO layout (see the module docstring)."""
    input_path = Path(input_path)
    builder = CocoBuilder(out_dir, split, labels, min_overlap_area)
    if input_path.is_file():
        add_cvat_file(builder, input_path, Path(images_dir) if images_dir is not None else input_path.parent)
    elif (input_path / "Annotations").is_dir():
        ids = _voc_ids(input_path, split)
        if not ids:
            raise DatasetError(f"{input_path}: no annotations to convert")
        for image_id in tqdm(ids, desc="xml2coco (VOC)", unit="image", disable=None):
            add_voc_image(builder, input_path, image_id)
    elif input_path.is_dir():
        raise DatasetError(f"{input_path} is a folder without Annotations/ (not a Pascal VOC root)")
    else:
        raise DatasetError(f"input not found: {input_path}")
    return builder.write()


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])  # errors: one line
    parser.add_argument("input", metavar="INPUT", help="a CVAT for-images XML file or a Pascal VOC root folder")
    parser.add_argument("--out", required=True, help="dataset root to write (images/ and annotations/)")
    parser.add_argument("--split", default="train", help="split name: writes annotations/instances_<split>.json")
    parser.add_argument("--labels", default=None,
                        help="comma-separated label names in category order (default: the labels found, sorted)")
    parser.add_argument("--images", default=None, help="CVAT only: folder of the images (default: the XML's folder)")
    add_min_overlap_area_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        summary = convert_xml(args.input, args.out, args.split, parse_labels(args.labels), args.images,
                              args.min_overlap_area)
    except DaCSegError as exc:
        print_error(exc)
        return 2
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
