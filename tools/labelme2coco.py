"""Convert labelme polygon annotations into the project's COCO layout.

    python tools/labelme2coco.py INPUT [INPUT ...] --out OUT_DIR [--split NAME] [--labels a,b,...]

INPUT: labelme JSON files or folders of them. Writes ``OUT_DIR/images/<name>`` (the embedded ``imageData`` as is,
else a copy of ``imagePath`` relative to the JSON) and ``OUT_DIR/annotations/instances_<split>.json``. Image names
are the JSON's stem plus the image's own suffix; a name already taken by a different image gets ``_2``, ``_3``, ...,
so converting another split into the same OUT_DIR never overwrites, and converting again gives the same names.

Categories are the labels as written (sorted, ids 1..K), or in the order of ``--labels`` (shapes with other labels
are skipped). Shapes sharing a ``group_id`` and label become one multi-part instance. ``bbox`` and ``area`` come
from pycocotools' rasterisation of the polygons; each annotation also gets ``"overlapping"``: its mask meets the
union of the other instances of the image over at least ``--min-overlap-area`` pixels.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, UnidentifiedImageError  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from tqdm import tqdm  # noqa: E402

from my_dataset_chromosome import DatasetError, read_json, usable_polygons  # noqa: E402
from overlaps import MIN_OVERLAP_AREA, overlapping_from_rles  # noqa: E402
from tools.coco_layout import polygon_bbox_area, write_coco_split  # noqa: E402
from errors import DaCSegError, one_line, print_error  # noqa: E402
from train_utils.cli import ArgumentParser, add_min_overlap_area_arg, expand_inputs  # noqa: E402

SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif"}  # Pillow format
MAX_EXAMPLES = 3  # source files named per skip reason in the summary


@dataclass
class ConversionSummary:
    """What a conversion wrote and what it skipped."""

    ann_file: Path
    images: int = 0
    instances: Counter = field(default_factory=Counter)  # label -> count
    overlapping: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few source files

    def lines(self) -> list[str]:
        total = sum(self.instances.values())
        lines = [f"wrote {self.ann_file}: {self.images} images, {total} instances"]
        lines += [f"  {label}: {n}" for label, n in sorted(self.instances.items())]
        share = f" ({100.0 * self.overlapping / total:.1f}%)" if total else ""
        lines.append(f"  overlapping instances: {self.overlapping}{share}")
        if not self.skipped:
            lines.append("  skipped: nothing")
        for reason, n in sorted(self.skipped.items()):
            examples = self.skipped_examples[reason]
            more = ", ..." if n > len(examples) else ""
            lines.append(f"  skipped {n} ({reason}): {', '.join(examples)}{more}")
        return lines


def parse_labels(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]``; DatasetError on empty or repeated names."""
    if text is None:
        return None
    labels = [name.strip() for name in text.split(",")]
    if not all(labels):
        raise DatasetError(f"--labels {text!r} has an empty name")
    repeated = sorted({name for name in labels if labels.count(name) > 1})
    if repeated:
        raise DatasetError(f"--labels repeats {', '.join(repeated)}")
    return labels


def image_size(data: bytes, source: str) -> tuple[str, int, int]:
    """Format, width and height of encoded image bytes (header only); DatasetError naming ``source`` (the file, or
    the JSON file and its field), never the in-memory buffer Pillow was given."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format or "", img.width, img.height
    except UnidentifiedImageError:
        raise DatasetError(f"{source} is not an image Pillow can read (PNG, JPEG, TIFF, BMP, ...)") from None
    except OSError as exc:
        raise DatasetError(f"cannot read image {source}: {one_line(exc)}") from None


class CocoBuilder:
    """Collects the images and instances of one split and writes them in the COCO layout under ``out_dir``."""

    def __init__(self, out_dir: str | Path, split: str, labels: Sequence[str] | None = None,
                 min_overlap_area: float = MIN_OVERLAP_AREA) -> None:
        if not split or any(c in split for c in "/\\"):
            raise DatasetError(f"--split {split!r} is not a usable split name")
        self.out_dir = Path(out_dir)
        self.split = split
        self.labels = list(labels) if labels is not None else None
        self.min_overlap_area = min_overlap_area
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.skipped: Counter = Counter()
        self.skipped_examples: dict[str, list[str]] = defaultdict(list)
        self._taken_names: dict[str, bytes] = {}  # file name -> sha256 of its bytes

    def skip(self, reason: str, source: str) -> None:
        self.skipped[reason] += 1
        examples = self.skipped_examples[reason]
        if len(examples) < MAX_EXAMPLES and source not in examples:
            examples.append(source)

    def accepts_label(self, label: str, source: str) -> bool:
        """False (and counted as skipped) when ``--labels`` was given and does not list ``label``."""
        if self.labels is None or label in self.labels:
            return True
        self.skip(f"label {label!r} not in --labels", source)
        return False

    def _store(self, data: bytes, stem: str, suffix: str) -> str:
        """Save ``data`` under ``images/`` with a unique, stable name and return that name."""
        images_dir = self.out_dir / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(data).digest()
        k = 1
        while True:
            name = f"{stem}{suffix}" if k == 1 else f"{stem}_{k}{suffix}"
            path = images_dir / name
            held = self._taken_names.get(name)
            if held is None and path.is_file():
                held = hashlib.sha256(path.read_bytes()).digest()
            if held is None or held == digest:
                break
            k += 1
        if held is None:
            path.write_bytes(data)
        self._taken_names[name] = digest
        return name

    def add_image(self, data: bytes, stem: str, source: str, suffix: str | None = None,
                  expected_size: tuple[int | None, int | None] = (None, None),
                  data_source: str | None = None) -> dict[str, Any]:
        """Store encoded image bytes and add their COCO image entry; ``expected_size`` is (width, height) or None;
        ``data_source`` names where the bytes came from in an error (default ``source``)."""
        fmt, width, height = image_size(data, data_source or source)
        exp_w, exp_h = expected_size
        if (exp_w is not None and exp_w != width) or (exp_h is not None and exp_h != height):
            raise DatasetError(f"{source}: the image is {width}x{height} but the annotation says {exp_w}x{exp_h}")
        name = self._store(data, stem, SUFFIX_OF_FORMAT.get(fmt, suffix or ".png"))
        entry = {"id": len(self.images) + 1, "file_name": name, "width": width, "height": height}
        self.images.append(entry)
        return entry

    def polygon_rle(self, polygons: list[list[float]], image: dict[str, Any], source: str):
        """Usable parts of a (multi-part) polygon and their merged RLE, by the dataset's rule
        (``my_dataset_chromosome.usable_polygons``); degenerate parts are skipped and counted."""
        return usable_polygons(polygons, image["height"], image["width"], source,
                               lambda reason: self.skip(reason, source))

    def add_instances(self, image: dict[str, Any], instances: Iterable[tuple[str, Any, dict]]) -> None:
        """Add ``(label, segmentation, rle)`` instances of one image, with bbox, area and the overlapping flag."""
        instances = list(instances)
        if not instances:
            return
        flags = overlapping_from_rles([rle for _, _, rle in instances], self.min_overlap_area)
        for (label, segmentation, rle), flag in zip(instances, flags):
            if isinstance(segmentation, list):
                bbox, area = polygon_bbox_area(segmentation, image["height"], image["width"])
            else:
                bbox, area = [float(v) for v in mask_utils.toBbox(rle)], float(mask_utils.area(rle))
            self.annotations.append({
                "id": len(self.annotations) + 1,
                "image_id": image["id"],
                "category_id": label,  # the name until write() numbers the categories
                "segmentation": segmentation,
                "bbox": bbox,
                "area": area,
                "iscrowd": 0,
                "overlapping": bool(flag),
            })

    def write(self) -> ConversionSummary:
        names = self.labels if self.labels is not None else sorted({a["category_id"] for a in self.annotations})
        cat_ids = {name: k + 1 for k, name in enumerate(names)}
        summary = ConversionSummary(ann_file=self.out_dir / "annotations" / f"instances_{self.split}.json",
                                    images=len(self.images), skipped=self.skipped,
                                    skipped_examples=dict(self.skipped_examples))
        if not self.images or not self.annotations:
            reasons = "; ".join(f"{n} skipped ({reason})" for reason, n in sorted(self.skipped.items()))
            wanted = f" with labels {', '.join(self.labels)}" if self.labels is not None else ""
            raise DatasetError(f"nothing to write for split {self.split!r}: {len(self.images)} image(s), "
                               f"{len(self.annotations)} instance(s){wanted}" + (f"; {reasons}" if reasons else ""))
        for ann in self.annotations:
            summary.instances[ann["category_id"]] += 1
            summary.overlapping += ann["overlapping"]
            ann["category_id"] = cat_ids[ann["category_id"]]
        categories = [{"id": k, "name": name} for name, k in cat_ids.items()]
        write_coco_split(self.out_dir, self.split, self.images, self.annotations, categories)
        return summary


def _read_labelme(path: Path) -> dict[str, Any]:
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise DatasetError(f"{path} is not a labelme file (no \"shapes\" list)")
    return doc


def _labelme_image_bytes(doc: dict[str, Any], path: Path) -> tuple[bytes, str, str]:
    """The image's bytes (embedded ``imageData`` or the ``imagePath`` file), its file suffix, and where the bytes
    came from, for an error message."""
    image_path = doc.get("imagePath") or ""
    suffix = Path(image_path).suffix.lower() or None
    if doc.get("imageData"):
        try:
            return base64.b64decode(doc["imageData"], validate=True), suffix, f"{path}: \"imageData\""
        except (binascii.Error, ValueError, TypeError):
            raise DatasetError(f"{path}: \"imageData\" is not valid base64") from None
    if not image_path:
        raise DatasetError(f"{path}: neither \"imageData\" nor \"imagePath\" is set")
    source = path.parent / image_path
    if not source.is_file():
        raise DatasetError(f"{path}: no \"imageData\" and its image {source} is not found")
    return source.read_bytes(), suffix, f"{path}: its image {source}"


def _labelme_polygon(shape: dict[str, Any], path: Path) -> list[float]:
    try:
        if any(len(point) != 2 for point in shape["points"]):
            raise ValueError
        return [float(v) for point in shape["points"] for v in point]
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{path}: shape {shape.get('label')!r} has malformed \"points\"") from None


def add_labelme_file(builder: CocoBuilder, path: Path) -> None:
    """Add one labelme JSON's image and its polygon shapes to ``builder``."""
    doc = _read_labelme(path)
    data, suffix, data_source = _labelme_image_bytes(doc, path)
    image = builder.add_image(data, path.stem, str(path), suffix,
                              expected_size=(doc.get("imageWidth"), doc.get("imageHeight")), data_source=data_source)
    groups: dict[tuple[str, Any], list[list[float]]] = defaultdict(list)
    for k, shape in enumerate(doc["shapes"]):
        if not isinstance(shape, dict):
            raise DatasetError(f"{path}: shape {k} is not an object")
        label = str(shape.get("label", ""))
        shape_type = shape.get("shape_type") or "polygon"
        if shape_type != "polygon":
            builder.skip(f"shape type {shape_type!r} is not a polygon", path.name)
            continue
        if not builder.accepts_label(label, path.name):
            continue
        group = shape.get("group_id")
        groups[(label, ("group", group) if group is not None else ("shape", k))].append(_labelme_polygon(shape, path))
    instances = []
    for (label, _), polygons in groups.items():
        segmentation, rle = builder.polygon_rle(polygons, image, path.name)
        if rle is not None:
            instances.append((label, segmentation, rle))
    builder.add_instances(image, instances)


def convert_labelme(inputs: Sequence[str | Path], out_dir: str | Path, split: str = "train",
                    labels: Sequence[str] | None = None, min_overlap_area: float = MIN_OVERLAP_AREA) -> ConversionSummary:
    """Convert labelme JSON files / folders into ``out_dir``'s COCO layout (see the module docstring)."""
    builder = CocoBuilder(out_dir, split, labels, min_overlap_area)
    for path in tqdm(expand_inputs(inputs, (".json",), "labelme files"), desc="labelme2coco", unit="file",
                     disable=None):
        add_labelme_file(builder, path)
    return builder.write()


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])  # errors: one line
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="labelme JSON files or folders of them")
    parser.add_argument("--out", required=True, help="dataset root to write (images/ and annotations/)")
    parser.add_argument("--split", default="train", help="split name: writes annotations/instances_<split>.json")
    parser.add_argument("--labels", default=None,
                        help="comma-separated label names in category order (default: the labels found, sorted)")
    add_min_overlap_area_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        summary = convert_labelme(args.inputs, args.out, args.split, parse_labels(args.labels), args.min_overlap_area)
    except DaCSegError as exc:
        print_error(exc)
        return 2
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
