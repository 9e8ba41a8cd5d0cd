"""Render dataset images with their ground truth (masks, boxes, overlapping instances outlined) to PNG files.

    python tools/show_dataset.py --data-path ROOT [--split train] --out DIR [--num N] [--start I]
        [--compare ROOT2 [--compare-split SPLIT]] [--no-raw] [--no-stats]

Each output PNG shows the raw image next to the annotated one. With ``--compare`` a second row shows item I of
another dataset (for instance real data converted with ``tools/labelme2coco.py`` under synthetic data), so the two
can be judged side by side. The statistics of each dataset (instances per image, overlapping fraction, instance
areas) are printed as well.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from my_dataset_chromosome import ChromosomeDataset, DatasetError  # noqa: E402
from tools.synth_metaphase import coco_statistics, format_statistics  # noqa: E402
from errors import DaCSegError, print_error  # noqa: E402
from train_utils.cli import ArgumentParser, number_arg  # noqa: E402
from train_utils.outputs.visualize import draw_instances  # noqa: E402


def render_item(dataset: ChromosomeDataset, index: int, raw: bool = True) -> list[Image.Image]:
    """Panels of item ``index``: the raw image (when ``raw``) and the image with its ground truth drawn."""
    image, target = dataset[index]
    name = dataset.image_path(index).name
    masks = target["masks"].bool()
    overlapping = target["overlapping"]
    title = (f"{dataset.root.name}/{dataset.split} {name}: {len(masks)} instances, "
             f"{int(overlapping.sum())} overlapping")
    annotated = draw_instances(image, masks, boxes=target["boxes"], overlapping=overlapping, title=title)
    if not raw:
        return [annotated]
    plain = draw_instances(image, masks[:0], title=f"{name} (raw)")
    return [plain, annotated]


def compose(rows: Sequence[Sequence[Image.Image]], gap: int = 6) -> Image.Image:
    """Panels laid out in rows on a dark background."""
    widths = [sum(p.width for p in row) + gap * (len(row) - 1) for row in rows]
    heights = [max(p.height for p in row) for row in rows]
    sheet = Image.new("RGB", (max(widths), sum(heights) + gap * (len(rows) - 1)), (32, 32, 32))
    y = 0
    for row, height in zip(rows, heights):
        x = 0
        for panel in row:
            sheet.paste(panel.convert("RGB"), (x, y))
            x += panel.width + gap
        y += height + gap
    return sheet


def show_dataset(data_path: str | Path, split: str, out: str | Path, num: int = 8, start: int = 0,
                 compare: str | Path | None = None, compare_split: str | None = None, raw: bool = True,
                 stats: bool = True) -> list[Path]:
    """Write up to ``num`` pictures of ``data_path``/``split``, from item ``start`` on, to ``out``.

    Returns the paths written. With ``compare``, item ``i`` of that dataset (split ``compare_split``, default
    ``split``) is drawn below item ``i`` (wrapping around when it has fewer items).
    """
    dataset = ChromosomeDataset(data_path, split)
    other = ChromosomeDataset(compare, compare_split or split) if compare is not None else None
    if len(dataset) == 0:
        raise DatasetError(f"{dataset.ann_file} has no images")
    if stats:
        for ds in (dataset, other):
            if ds is not None:
                print(f"{ds.ann_file}:\n{format_statistics(coco_statistics(ds.coco.dataset))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in tqdm(range(start, min(start + num, len(dataset))), desc="show", unit="img", disable=None):
        rows = [render_item(dataset, index, raw)]
        if other is not None and len(other):
            rows.append(render_item(other, index % len(other), raw))
        path = out / f"{split}_{index:04d}_{dataset.image_path(index).stem}.png"
        compose(rows).save(path)
        written.append(path)
    return written


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True, help="dataset root (images/, annotations/instances_<split>.json)")
    parser.add_argument("--split", default="train",
                        help="split to show: annotations/instances_SPLIT.json (default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--num", type=number_arg(int, low=1), default=8, help="number of images to render")
    parser.add_argument("--start", type=number_arg(int, low=0), default=0, help="index of the first item")
    parser.add_argument("--compare", metavar="ROOT2", help="second dataset shown below each picture")
    parser.add_argument("--compare-split", help="split of --compare (default: --split)")
    parser.add_argument("--raw", action=argparse.BooleanOptionalAction, default=True,
                        help="show the raw image next to the annotated one")
    parser.add_argument("--stats", action=argparse.BooleanOptionalAction, default=True,
                        help="print instance statistics of each dataset")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        written = show_dataset(args.data_path, args.split, args.out, args.num, args.start, args.compare,
                               args.compare_split, args.raw, args.stats)
    except (DaCSegError, OSError) as err:
        print_error(err)
        return 2
    print(f"wrote {len(written)} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
