"""Cut crops around crossing chromosomes (and control crops without any) from a COCO-layout split.

    python tools/crossing_crops.py --data-path ROOT --split val --out OUT [--crop-size 160] [--margin 8]

The chromosomes that cross (``overlaps.crossing_pairs``: two masks sharing at least ``--min-overlap-area`` px) are
grouped into clusters (connected components of "crosses"). Each cluster gets one square crop of ``--crop-size`` px at
the original scale, centred on the cluster and kept inside the image. Every instance the crop cuts is clipped to it,
its amodal outline kept (a crossing's covered arm stays in both masks); pieces with fewer than ``--min-visible`` px
are dropped. ``--controls`` control crops per cluster (default 1) are cut where no crossing chromosome is, so a model
cannot learn that every crop holds a crossing.

Writes ``OUT/images/*.png`` and ``OUT/annotations/instances_<split>.json`` (``--out-split``, default ``--split``), a
dataset every script reads. Each image carries ``kind`` ("crossing" or "control"), ``source``, ``x``, ``y`` and
``pairs`` (the annotation id pairs of the cluster's crossings); each annotation carries ``overlapping`` (the rule,
on the clipped masks) and ``focus``: the instances the crop is scored on (the cluster's members in a crossing crop,
every instance in a control crop; ``train_utils.evaluation.crossings``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from errors import DaCSegError, print_error  # noqa: E402
from my_dataset_chromosome import ChromosomeDataset, read_image  # noqa: E402
from overlaps import MIN_OVERLAP_AREA, crossing_clusters, crossing_pairs, overlapping_from_rles  # noqa: E402
from tools.coco_layout import rle_from_mask, write_coco_split  # noqa: E402
from train_utils.cli import ArgumentParser, add_min_overlap_area_arg, number_arg  # noqa: E402

CROSSING, CONTROL = "crossing", "control"
CONTROL_TRIES = 200  # random windows tried per control crop


@dataclass(frozen=True)
class Window:
    """A crop of one source image: its top-left corner and kind, and the source instances it is about."""

    x: int
    y: int
    kind: str
    focus: tuple[int, ...] = ()  # source instance indices of the cluster (crossing crops)


def union_box(boxes: np.ndarray) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 around xywh ``boxes``."""
    return (float(boxes[:, 0].min()), float(boxes[:, 1].min()),
            float((boxes[:, 0] + boxes[:, 2]).max()), float((boxes[:, 1] + boxes[:, 3]).max()))


def cluster_window(box: tuple[float, float, float, float], size: int, width: int, height: int) -> tuple[int, int]:
    """The top-left corner of the ``size`` square centred on ``box``, moved inside the image."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x = int(round(cx - size / 2))
    y = int(round(cy - size / 2))
    return min(max(x, 0), width - size), min(max(y, 0), height - size)


def control_windows(boxes: np.ndarray, crossing: Sequence[int], count: int, size: int, width: int, height: int,
                    rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to ``count`` random ``size`` squares that touch no crossing instance's box and hold the whole box of at
    least one instance."""
    found: list[tuple[int, int]] = []
    low, high = boxes[:, :2], boxes[:, :2] + boxes[:, 2:]
    for _ in range(CONTROL_TRIES):
        if len(found) == count:
            break
        x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        touches = (low[:, 0] < x + size) & (high[:, 0] > x) & (low[:, 1] < y + size) & (high[:, 1] > y)
        inside = (low[:, 0] >= x) & (high[:, 0] <= x + size) & (low[:, 1] >= y) & (high[:, 1] <= y + size)
        if touches[list(crossing)].any() or not inside.any():
            continue
        if all(abs(x - fx) >= size // 2 or abs(y - fy) >= size // 2 for fx, fy in found):  # controls barely overlap
            found.append((x, y))
    return found


def image_windows(rles: Sequence[dict[str, Any]], width: int, height: int, size: int, margin: int,
                  controls: float, min_overlap_area: float, rng: np.random.Generator) -> tuple[list[Window], int]:
    """The crossing and control windows of one image, and how many of its clusters do not fit a crop with margin."""
    pairs = crossing_pairs(rles, min_overlap_area)
    clusters = crossing_clusters(len(rles), pairs)
    boxes = mask_utils.toBbox(list(rles)).reshape(-1, 4) if rles else np.zeros((0, 4))
    windows, too_large = [], 0
    for members in clusters:
        box = union_box(boxes[members])
        too_large += max(box[2] - box[0], box[3] - box[1]) + 2 * margin > size
        windows.append(Window(*cluster_window(box, size, width, height), CROSSING, tuple(members)))
    crossing = sorted({k for members in clusters for k in members})
    count = int(np.floor(controls * len(clusters) + rng.random()))  # ``controls`` per cluster on average
    windows += [Window(x, y, CONTROL) for x, y in control_windows(boxes, crossing, count, size, width, height, rng)]
    return windows, too_large


def clip_instances(masks: np.ndarray, window: Window, size: int, min_visible: int
                   ) -> tuple[list[int], list[np.ndarray]]:
    """Source indices and clipped masks of the instances with at least ``min_visible`` px inside ``window``."""
    kept, clipped = [], []
    for k, mask in enumerate(masks):
        part = mask[window.y:window.y + size, window.x:window.x + size]
        if int(part.sum()) >= min_visible or k in window.focus:
            kept.append(k)
            clipped.append(np.ascontiguousarray(part))
    return kept, clipped


@dataclass
class CropCounts:
    """What ``cut_crops`` wrote."""

    images: int = 0
    clusters: int = 0
    crossing_instances: int = 0
    pairs: int = 0
    controls: int = 0
    control_instances: int = 0
    too_large: int = 0
    skipped_small_images: int = 0

    def line(self, split: str) -> str:
        return (f"{split}: {self.images} images -> {self.clusters} crossing crops ({self.crossing_instances} crossing "
                f"instances, {self.pairs} crossing pairs; {self.too_large} clusters larger than the crop, clipped), "
                f"{self.controls} control crops ({self.control_instances} instances)"
                + (f"; {self.skipped_small_images} images smaller than the crop skipped"
                   if self.skipped_small_images else ""))


def crop_annotations(clipped: Sequence[np.ndarray], kept: Sequence[int], window: Window, labels: Sequence[int],
                     image_id: int, first_ann_id: int, min_overlap_area: float) -> tuple[list[dict], list[list[int]]]:
    """COCO annotations of one crop's clipped masks (``focus`` and ``overlapping`` set), and its crossing pairs."""
    rles = [rle_from_mask(m) for m in clipped]
    flags = overlapping_from_rles(rles, min_overlap_area)
    anns = []
    for n, (rle, k) in enumerate(zip(rles, kept)):
        area = float(mask_utils.area(rle))
        anns.append({"id": first_ann_id + n, "image_id": image_id, "category_id": int(labels[k]), "segmentation": rle,
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": area, "iscrowd": 0,
                     "overlapping": flags[n], "focus": window.kind == CONTROL or k in window.focus})
    focus = [n for n, k in enumerate(kept) if k in window.focus]
    pairs = [[anns[focus[a]]["id"], anns[focus[b]]["id"]]
             for a, b in crossing_pairs([rles[n] for n in focus], min_overlap_area)]
    return anns, pairs


def cut_crops(data_path: str | Path, split: str, out: str | Path, out_split: str | None = None, crop_size: int = 160,
              margin: int = 8, controls: float = 1.0, min_visible: int = 50,
              min_overlap_area: float = MIN_OVERLAP_AREA, seed: int = 0) -> CropCounts:
    """Cut the crossing and control crops of ``data_path``/``split`` into the COCO layout at ``out``."""
    dataset = ChromosomeDataset(data_path, split, min_overlap_area=min_overlap_area)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = CropCounts()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, image_id in enumerate(dataset.ids):
        info = dataset.coco.imgs[image_id]
        width, height = int(info["width"]), int(info["height"])
        if width < crop_size or height < crop_size:
            counts.skipped_small_images += 1
            continue
        anns = [a for a in dataset.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        rles = [dataset.coco.annToRLE(a) for a in anns]
        windows, too_large = image_windows(rles, width, height, crop_size, margin, controls, min_overlap_area, rng)
        counts.images += 1
        counts.too_large += too_large
        if not windows:
            continue
        pixels = _pixels(read_image(dataset.image_path(index)))
        masks = mask_utils.decode(rles).transpose(2, 0, 1) if rles else np.zeros((0, height, width), np.uint8)
        stem = Path(info["file_name"]).stem
        for window in windows:
            crop_id = len(images) + 1
            kept, clipped = clip_instances(masks, window, crop_size, min_visible)
            crop_anns, pairs = crop_annotations(clipped, kept, window, [a["category_id"] for a in anns], crop_id,
                                                len(annotations) + 1, min_overlap_area)
            name = f"{stem}_{window.kind}_x{window.x}_y{window.y}.png"
            Image.fromarray(pixels[window.y:window.y + crop_size, window.x:window.x + crop_size]).save(
                out / "images" / name)
            images.append({"id": crop_id, "file_name": name, "width": crop_size, "height": crop_size,
                           "kind": window.kind, "source": info["file_name"], "x": window.x, "y": window.y,
                           "pairs": pairs})
            annotations += crop_anns
            focus = sum(a["focus"] for a in crop_anns)
            if window.kind == CROSSING:
                counts.clusters += 1
                counts.crossing_instances += focus
                counts.pairs += len(pairs)
            else:
                counts.controls += 1
                counts.control_instances += focus
    write_coco_split(out, out_split or split, images, annotations, list(dataset.coco.dataset["categories"]),
                     info={"description": f"crossing and control crops of {data_path} split {split}",
                           "crop_size": crop_size, "margin": margin, "min_overlap_area": min_overlap_area,
                           "seed": seed, "counts": vars(counts)})
    return counts


def _pixels(image) -> np.ndarray:
    """An 8-bit ``[H, W]`` (grey) or ``[H, W, 3]`` array of a ``read_image`` tensor."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return array[..., 0].copy() if (array == array[..., :1]).all() else array


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", type=Path, required=True, help="COCO-layout dataset root")
    parser.add_argument("--split", required=True, help="split to cut (annotations/instances_<split>.json)")
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write the crops into")
    parser.add_argument("--out-split", default=None, help="split name of the crops (default: --split)")
    parser.add_argument("--crop-size", type=number_arg(int, low=16), default=160, help="crop side in px (default 160)")
    parser.add_argument("--margin", type=number_arg(int, low=0), default=8,
                        help="px a cluster should keep from the crop's edge (default 8; reported when it does not)")
    parser.add_argument("--controls", type=number_arg(float, low=0.0), default=1.0,
                        help="control crops per cluster (default 1)")
    parser.add_argument("--min-visible", type=number_arg(int, low=1), default=50,
                        help="drop clipped instance pieces smaller than this many px (default 50)")
    parser.add_argument("--seed", type=number_arg(int, low=0), default=0, help="seed of the control windows")
    add_min_overlap_area_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        counts = cut_crops(args.data_path, args.split, args.out, args.out_split, args.crop_size, args.margin,
                           args.controls, args.min_visible, args.min_overlap_area, args.seed)
    except DaCSegError as exc:
        print_error(exc, "crossing_crops.py")
        return 2
    print(counts.line(args.out_split or args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
