"""Chromosome instance-segmentation data in the COCO layout: images and targets as ``tv_tensors``.

Default layout: ``root/images/<file_name>`` and ``root/annotations/instances_<split>.json``. When those are absent the
upstream DaCSeg layout is used: ``root/imgb/`` and ``root/annotations/instances_overlap1_else_<split>2017.json``.

Targets follow torchvision's detection references, with a few choices of our own:

* ``boxes`` are the tight box of each decoded mask, in COCO's pixel-edge convention (``x2 = last column + 1``), so
  a box never disagrees with its mask, whatever the JSON's ``bbox`` says.
* Crowd annotations (``iscrowd: 1``) are left out of the targets, as torchvision's references do; they stay in
  ``.coco`` where COCOeval uses them as ignore regions.
* Degenerate polygons (fewer than 3 points, outside the image, zero area) and empty RLE masks are skipped and
  counted in one warning per dataset; ``.coco`` holds the same cleaned annotations, so evaluation sees what training
  sees.
* Extra annotation fields (for instance the upstream ``overlap`` / ``overlap_else`` polygons) are ignored.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import tifffile
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import io as tv_io
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from tqdm import tqdm

from errors import DaCSegError, one_line
from overlaps import MIN_OVERLAP_AREA, instance_flags, segmentation_rle

UPSTREAM_IMAGES_DIR = "imgb"


class DatasetError(DaCSegError):
    """Bad dataset input; the message is one line naming the file or id at fault."""


class MaskMismatchWarning(UserWarning):
    """An annotation's JSON ``bbox`` or ``area`` disagrees with its mask; the mask's are used."""


class DegenerateAnnotationWarning(UserWarning):
    """Some polygons or masks could not be used and were skipped (one warning per dataset)."""


def _scale_by_range(array: np.ndarray) -> np.ndarray:
    """High bit-depth pixels to 0..1 from their real minimum..maximum (a 12-bit camera image fills 0..1 too)."""
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros_like(array)
    return (array - low) / (high - low)


def _is_16_bit_colour_png(path: Path) -> bool:
    """PNG header: bit depth 16 with colour type RGB (2) or RGBA (6)."""
    with open(path, "rb") as f:
        header = f.read(26)
    return len(header) == 26 and header[24] == 16 and header[25] in (2, 6)


def _read_16_bit_colour_png(path: Path) -> np.ndarray:
    """Pillow truncates 16-bit colour PNGs to 8 bits; libpng through torchvision.io keeps them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
        data = tv_io.decode_png(tv_io.read_file(str(path)), mode=tv_io.ImageReadMode.UNCHANGED)
    return _scale_by_range(data[:3].permute(1, 2, 0).numpy())


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
# what Pillow and tifffile raise for a file they cannot decode
_DECODE_ERRORS = (OSError, UnidentifiedImageError, RuntimeError, ValueError, SyntaxError, IndexError,
                  tifffile.TiffFileError)


def _read_tiff(path: Path) -> np.ndarray:
    """The first page of a TIFF through tifffile (Pillow drops the low bits of 16-bit colour and cannot read many
    microscope layouts): ``[H, W]`` or ``[H, W, C]``, channels last whether the file stores them interleaved or as
    planes; 8-bit in 0..1 by /255, anything else by its own min..max (``_scale_by_range``). Of two channels the
    first is used, as grey; of three or more the first three, as RGB (the README states both rules)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
            return _read_with_pillow(path)  # Pillow expands the colour map
        array, axes = page.asarray(), page.axes
    if array.ndim == 3 and axes[0] in "SC":  # planar: channels first
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 2:  # two fluorescence channels: the first, as grey
        array = array[..., 0]
    if array.ndim == 3:
        array = array[..., :3]  # RGB of RGBA, or the first three channels
    if array.ndim not in (2, 3):
        raise ValueError(f"unsupported TIFF layout {axes} {list(array.shape)}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == bool:
        return array.astype(np.float32)
    return _scale_by_range(array)


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the file's header alone, read the way ``read_image`` reads it; ``DatasetError``
    naming the file when the header cannot be read."""
    path = Path(path)
    try:
        if _is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagewidth), int(page.imagelength)
        with Image.open(path) as img:
            return img.size
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot read image {path}: {one_line(exc)}") from None


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image as float32 ``[3, H, W]`` in 0..1.

    8-bit images are divided by 255; 16-bit and 32-bit images are scaled from their real min..max range (a 12-bit
    camera image in a 16-bit file fills 0..1). Grey is repeated to three channels, alpha is dropped, palettes are
    expanded. TIFFs are read with tifffile, first page only (see ``_read_tiff``); the rest with Pillow.
    Raises DatasetError naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image not found: {path}")
    try:
        array = _read_tiff(path) if _is_tiff(path) else _read_with_pillow(path)
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot read image {path}: {one_line(exc)}") from None
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0).expand(3, -1, -1)
    else:
        tensor = tensor.permute(2, 0, 1)
    return tensor.contiguous()


def _read_with_pillow(path: Path) -> np.ndarray:
    """``[H, W]`` or ``[H, W, 3]`` float32 in 0..1 (see ``read_image``)."""
    with Image.open(path) as img:
        img.seek(0)
        if img.format == "PNG" and img.mode in ("RGB", "RGBA") and _is_16_bit_colour_png(path):
            array = _read_16_bit_colour_png(path)
        elif img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            array = _scale_by_range(np.array(img))
        else:
            if img.mode in ("1", "LA", "L"):
                img = img.convert("L")
            elif img.mode != "RGB":  # P (through RGBA, for palettes with transparency), RGBA, CMYK, YCbCr, ...
                img = (img.convert("RGBA") if img.mode == "P" else img).convert("RGB")
            array = np.asarray(img, dtype=np.float32) / 255.0
    return array


def load_label_json(path: str | os.PathLike) -> dict[int, str]:
    """Read a label JSON such as ``{"1": "chromosome"}`` into ``{1: "chromosome"}`` (labels must be 1..K)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"label JSON not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"malformed JSON in {path}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"label JSON {path} must be a non-empty object like {{\"1\": \"chromosome\"}}")
    try:
        label_names = {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise DatasetError(f"label JSON {path} has a key that is not an integer label") from None
    if sorted(label_names) != list(range(1, len(label_names) + 1)):
        raise DatasetError(f"label JSON {path} must number its labels 1..{len(label_names)}, got {sorted(label_names)}")
    return dict(sorted(label_names.items()))


def save_label_json(label_names: Mapping[int, str], path: str | os.PathLike) -> None:
    """Write ``{1: "chromosome"}`` as ``{"1": "chromosome"}`` (the seeds' ``--label-json-path`` format)."""
    Path(path).write_text(json.dumps({str(k): v for k, v in sorted(label_names.items())}, indent=2) + "\n")


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY float32 box of each non-empty ``[N, H, W]`` mask, pixel-edge convention (x2 = last column + 1)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    boxes = masks_to_boxes(masks.as_subclass(torch.Tensor)).float()
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])


def read_json(path: Path) -> Any:
    """Parse a JSON file; a malformed or unreadable one raises ``DatasetError`` naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"malformed JSON in {path}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {one_line(exc)}") from None


def _load_json(path: Path) -> dict[str, Any]:
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DatasetError(f"{path} is not a COCO annotation file (no \"images\" list)")
    for key in ("annotations", "categories"):
        if not isinstance(doc.setdefault(key, []), list):
            raise DatasetError(f"{path}: \"{key}\" must be a list")
    return doc


def _disagrees_with_mask(ann: dict[str, Any], bbox: list[float], area: float) -> bool:
    """Whether the JSON box is off the mask's by more than a pixel, or the JSON area by more than a one-pixel rim."""
    given_box, given_area = ann.get("bbox"), ann.get("area")
    if isinstance(given_box, list) and len(given_box) == 4:
        try:
            if max(abs(float(a) - b) for a, b in zip(given_box, bbox)) > 1.0:
                return True
        except (TypeError, ValueError):
            return True
    if isinstance(given_area, (int, float)):
        rim = 2.0 * (bbox[2] + bbox[3])  # a one-pixel band around the box: rasterising a polygon moves its edge
        return abs(float(given_area) - area) > max(rim, 1.0)
    return False


class _SkipCounter:
    """Counts skipped polygons / masks by reason, for the one warning per dataset."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.dropped_annotations = 0

    def message(self, ann_file: Path) -> str:
        parts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.reasons.items()))
        return (f"{ann_file}: skipped {sum(self.reasons.values())} degenerate polygon(s)/mask(s) ({parts}); "
                f"{self.dropped_annotations} annotation(s) had nothing usable left and were left out")


def polygon_in_reach(polygon: list[float], height: int, width: int) -> bool:
    """Whether every coordinate is finite and within a few image sizes of the image: pycocotools rasterises the whole
    outline, so one stray point (``1e9``, ``Infinity``) would exhaust the memory."""
    reach = 4 * max(height, width)
    return all(math.isfinite(v) and -reach <= v <= reach for v in polygon)


def usable_polygons(polygons: list, height: int, width: int, where: str,
                    skip: Callable[[str], Any]) -> tuple[list[list[float]], dict[str, Any] | None]:
    """The usable parts of a (multi-part) polygon and their merged RLE (None when no part is usable).

    A part with fewer than 3 points, entirely outside the image or of zero area is left out and ``skip(reason)``
    told; a part that is not a flat list of numbers, or that has a point far outside the image, is a
    ``DatasetError`` naming ``where``. The dataset and the converters share this rule.
    """
    parts, rles = [], []
    for poly in polygons:
        if not isinstance(poly, list) or len(poly) % 2 or not all(isinstance(v, (int, float)) for v in poly):
            raise DatasetError(f"{where}: a polygon must be a flat list [x0, y0, x1, y1, ...] of numbers")
        if not polygon_in_reach(poly, height, width):
            raise DatasetError(f"{where}: a polygon point is not finite or lies far outside the {width}x{height} image")
        xs, ys = poly[0::2], poly[1::2]
        if len(poly) < 6:
            skip("fewer than 3 points")
        elif max(xs) <= 0 or min(xs) >= width or max(ys) <= 0 or min(ys) >= height:
            skip("outside the image")
        else:
            rle = mask_utils.frPyObjects([[float(v) for v in poly]], height, width)[0]
            if mask_utils.area(rle) == 0:
                skip("zero area")
            else:
                parts.append([float(v) for v in poly])
                rles.append(rle)
    return parts, (mask_utils.merge(rles) if rles else None)


def _annotation_rle(ann: dict[str, Any], height: int, width: int, skipped: _SkipCounter, where: str):
    """Compressed RLE of an annotation and its cleaned segmentation, or ``(None, None)`` when nothing is usable."""
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if size != [height, width]:
            raise DatasetError(f"{where}: RLE size {size} does not match the image size [{height}, {width}]")
        if not isinstance(counts, (list, str, bytes)):
            raise DatasetError(f"{where}: RLE \"counts\" must be a list or a string")
        try:
            rle = segmentation_rle(segmentation, height, width)
            empty = mask_utils.area(rle) == 0
        except Exception as exc:  # pycocotools raises bare errors on corrupt counts
            raise DatasetError(f"{where}: corrupt RLE ({one_line(exc)})") from None
        if empty:
            skipped.reasons["empty mask"] += 1
            return None, None
        return rle, segmentation
    if not isinstance(segmentation, list):
        raise DatasetError(f"{where}: no polygon or RLE \"segmentation\"")
    parts, rle = usable_polygons(segmentation, height, width, where, lambda reason: skipped.reasons.update([reason]))
    return (None, None) if rle is None else (rle, parts)


def _quiet_coco(dataset: dict[str, Any]) -> COCO:
    """A pycocotools COCO index over an in-memory dict, without its prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class ChromosomeDataset(torch.utils.data.Dataset):
    """COCO-layout chromosome dataset; ``ds[i] -> (image, target)`` with torchvision ``tv_tensors``.

    ``target``: ``boxes`` (BoundingBoxes XYXY float32), ``masks`` (Mask uint8 ``[N, H, W]``), ``labels`` (int64,
    contiguous 1..K), ``image_id`` (int), ``area`` (float32), ``iscrowd`` (int64), ``overlapping`` (bool: the
    annotation's ``overlapping`` flag, else whether the mask meets the union of the others over
    ``min_overlap_area`` pixels).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Callable | None = None,
        ann_file: str | os.PathLike | None = None,
        images_dir: str | os.PathLike | None = None,
        min_overlap_area: float = MIN_OVERLAP_AREA,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.min_overlap_area = float(min_overlap_area)
        self.ann_file, default_images_dir = self._find_annotation_file(ann_file)
        self.images_dir = Path(images_dir) if images_dir is not None else default_images_dir

        doc = _load_json(self.ann_file)
        self._index_categories(doc["categories"])
        self._index_images_and_instances(doc)
        self.ids = sorted(self._images)
        self.invert_ids: set[int] = set()  # image ids whose grey levels are inverted as they load (``--stain``)

    def _find_annotation_file(self, ann_file: str | os.PathLike | None) -> tuple[Path, Path]:
        default_images = self.root / "images"
        upstream_images = self.root / UPSTREAM_IMAGES_DIR
        if ann_file is not None:
            path = Path(ann_file)
            if not path.is_file():
                raise DatasetError(f"annotation file not found: {path}")
            return path, default_images if default_images.is_dir() or not upstream_images.is_dir() else upstream_images
        ours = self.root / "annotations" / f"instances_{self.split}.json"
        upstream = self.root / "annotations" / f"instances_overlap1_else_{self.split}2017.json"
        if ours.is_file():
            return ours, default_images
        if upstream.is_file():
            return upstream, upstream_images
        raise DatasetError(f"no annotations for split {self.split!r}: neither {ours} nor {upstream} exists")

    def _index_categories(self, categories: list[dict[str, Any]]) -> None:
        if not categories:
            raise DatasetError(f"{self.ann_file} has no categories (its \"categories\" list is empty or missing); "
                               "a model needs at least one, e.g. [{\"id\": 1, \"name\": \"chromosome\"}]")
        cat_ids = []
        names = {}
        for cat in categories:
            if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
                raise DatasetError(f"{self.ann_file}: category {cat!r} has no integer \"id\"")
            if cat["id"] in names:
                raise DatasetError(f"{self.ann_file}: duplicate category id {cat['id']}")
            names[cat["id"]] = str(cat.get("name", cat["id"]))
            cat_ids.append(cat["id"])
        self.cat_id_to_label: dict[int, int] = {cat_id: k + 1 for k, cat_id in enumerate(sorted(cat_ids))}
        self.label_to_cat_id: dict[int, int] = {k: c for c, k in self.cat_id_to_label.items()}
        self.label_names: dict[int, str] = {k: names[c] for k, c in self.label_to_cat_id.items()}
        self.num_classes = len(self.label_names)

    def _index_images_and_instances(self, doc: dict[str, Any]) -> None:
        self._images: dict[int, dict[str, Any]] = {}
        for img in doc["images"]:
            image_id = img.get("id") if isinstance(img, dict) else None
            if not isinstance(image_id, int):
                raise DatasetError(f"{self.ann_file}: image entry {img!r} has no integer \"id\"")
            if image_id in self._images:
                raise DatasetError(f"{self.ann_file}: duplicate image id {image_id}")
            sizes = [img.get(k) for k in ("width", "height")]
            if not isinstance(img.get("file_name"), str) or not all(
                    isinstance(v, (int, float)) and v > 0 and float(v).is_integer() for v in sizes):
                raise DatasetError(
                    f"{self.ann_file}: image id {image_id} needs \"file_name\", \"width\" and \"height\"")
            name = Path(img["file_name"])
            if name.is_absolute() or ".." in name.parts:
                raise DatasetError(f"{self.ann_file}: image id {image_id} has file_name {img['file_name']!r}, which "
                                   f"points outside {self.images_dir}; file names are relative to it")
            self._images[image_id] = {**img, "width": int(sizes[0]), "height": int(sizes[1])}
        self._index_instances(doc)

    def _index_instances(self, doc: dict[str, Any]) -> None:
        """Check every annotation, keep its usable mask (one warning counts what was skipped) and index the
        non-crowd ones per image; ``.coco`` holds the same cleaned annotations for evaluation."""
        skipped = _SkipCounter()
        self._instances: dict[int, list[dict[str, Any]]] = {i: [] for i in self._images}
        kept_annotations, seen_ids, mismatched = [], set(), 0
        for number, ann in enumerate(doc["annotations"]):
            img, where = self._checked_annotation(ann, number, seen_ids)
            rle, segmentation = _annotation_rle(ann, img["height"], img["width"], skipped, where)
            if rle is None:
                skipped.dropped_annotations += 1
                continue
            # the mask is the one truth: training boxes come from it, so evaluation's box and area do too
            area, bbox = float(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]
            mismatched += _disagrees_with_mask(ann, bbox, area)
            kept = {**ann, "segmentation": segmentation, "area": area, "bbox": bbox,
                    "iscrowd": int(ann.get("iscrowd", 0) or 0)}
            kept_annotations.append(kept)
            if not kept["iscrowd"]:
                flag = ann.get("overlapping")
                self._instances[img["id"]].append({"rle": rle, "label": self.cat_id_to_label[ann["category_id"]],
                                                   "area": area, "overlapping": None if flag is None else bool(flag)})
        if skipped.reasons:
            warnings.warn(skipped.message(self.ann_file), DegenerateAnnotationWarning, stacklevel=4)
        if mismatched:
            warnings.warn(f"{self.ann_file}: {mismatched} annotation(s) have a \"bbox\" or \"area\" that disagrees "
                          "with their mask by more than a pixel; the mask's box and area are used",
                          MaskMismatchWarning, stacklevel=4)
        self.coco = _quiet_coco({**doc, "annotations": kept_annotations})

    def _checked_annotation(self, ann: Any, number: int, seen_ids: set[int]) -> tuple[dict[str, Any], str]:
        """The image of annotation ``number`` and how errors name it; DatasetError for a bad id, image or class."""
        if not isinstance(ann, dict):
            raise DatasetError(f"{self.ann_file}: annotation entry {ann!r} is not an object")
        ann_id = ann.get("id")
        if not isinstance(ann_id, int) or isinstance(ann_id, bool):
            raise DatasetError(f"{self.ann_file}: annotation number {number + 1} (image id {ann.get('image_id')}) "
                               "has no integer \"id\"")
        if ann_id in seen_ids:
            raise DatasetError(f"{self.ann_file}: duplicate annotation id {ann_id} (COCO evaluation indexes "
                               "annotations by id)")
        seen_ids.add(ann_id)
        where = f"{self.ann_file}: annotation {ann_id}"
        img = self._images.get(ann.get("image_id"))
        if img is None:
            raise DatasetError(f"{where} points at unknown image id {ann.get('image_id')}")
        if ann.get("category_id") not in self.cat_id_to_label:
            raise DatasetError(f"{where} has unknown category id {ann.get('category_id')}")
        return img, where

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of each item, from the JSON (no image decoding); for aspect-ratio grouping."""
        return [self._images[i]["width"] / self._images[i]["height"] for i in self.ids]

    def check_images(self, show_progress: bool = True) -> None:
        """Cheaply check every image before training: the file exists and its header says the JSON's size.

        Raises ``DatasetError`` naming the first bad image (a corrupt body is found only when it is decoded).
        """
        for image_id in tqdm(self.ids, desc=f"checking {self.split} images", unit="img", leave=False,
                             disable=None if show_progress else True):
            info = self._images[image_id]
            path = self.images_dir / info["file_name"]
            if not path.is_file():
                raise DatasetError(f"image not found: {path} (image id {image_id} in {self.ann_file})")
            size = image_size(path)
            if size != (info["width"], info["height"]):
                raise DatasetError(f"image {path} is {size[0]}x{size[1]} but {self.ann_file} says "
                                   f"{info['width']}x{info['height']} (image id {image_id})")

    @property
    def num_instances(self) -> int:
        """Instances (not crowd) over the dataset's images."""
        return sum(len(self._instances[i]) for i in self.ids)

    def image_path(self, index: int) -> Path:
        """Where item ``index``'s image file is (not checked)."""
        return self.images_dir / self._images[self.ids[index]]["file_name"]

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_id = self.ids[index]
        info = self._images[image_id]
        height, width = info["height"], info["width"]
        path = self.images_dir / info["file_name"]
        if not path.is_file():
            raise DatasetError(f"image not found: {path} (image id {image_id} in {self.ann_file})")
        image = read_image(path)
        if tuple(image.shape[-2:]) != (height, width):
            raise DatasetError(f"image {path} is {image.shape[-1]}x{image.shape[-2]} but {self.ann_file} says "
                               f"{width}x{height} (image id {image_id})")
        if image_id in self.invert_ids:
            image = 1.0 - image

        instances = self._instances[image_id]
        rles = [inst["rle"] for inst in instances]
        if instances:
            masks = torch.from_numpy(mask_utils.decode(rles).transpose(2, 0, 1).copy())  # decode gives [H, W, N]
            boxes = torch.from_numpy(mask_utils.toBbox(rles)).float()  # tight xywh, as boxes_from_masks
            boxes[:, 2:] += boxes[:, :2]
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
            boxes = torch.zeros((0, 4), dtype=torch.float32)
        flags = instance_flags([inst["overlapping"] for inst in instances], rles, self.min_overlap_area)
        overlapping = torch.tensor(flags, dtype=torch.bool)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "masks": tv_tensors.Mask(masks),
            "labels": torch.tensor([inst["label"] for inst in instances], dtype=torch.int64),
            "image_id": image_id,
            "area": torch.tensor([inst["area"] for inst in instances], dtype=torch.float32),
            "iscrowd": torch.zeros(len(instances), dtype=torch.int64),
            "overlapping": overlapping,
        }
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
