"""Shared fixtures: a tiny hand-made COCO chromosome set (bars, some crossing) and the real-data location."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tools.coco_layout import polygon_bbox_area, write_coco_split

REPO_ROOT = Path(__file__).resolve().parents[1]
BIOIMLAB = REPO_ROOT.parent / "shared" / "data" / "bioimlab"

torch.set_num_threads(min(2, torch.get_num_threads()))


def bar_polygon(cx: float, cy: float, length: float, width: float, angle_deg: float) -> list[float]:
    """Flat polygon of a rotated rectangle (a stand-in chromosome)."""
    a = math.radians(angle_deg)
    dx, dy = math.cos(a), math.sin(a)
    nx, ny = -dy, dx
    hl, hw = length / 2, width / 2
    corners = [(+hl, +hw), (+hl, -hw), (-hl, -hw), (-hl, +hw)]
    return [v for sx, sw in corners for v in (cx + sx * dx + sw * nx, cy + sx * dy + sw * ny)]


def make_tiny_coco(root: Path, split: str, num_images: int, size: tuple[int, int] = (160, 128), seed: int = 0) -> Path:
    """Write a few grey images of bright bars with a crossing pair in each, in the project's COCO layout."""
    rng = np.random.default_rng(seed)
    width, height = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = i + 1
        canvas = Image.new("L", size, 20)
        draw = ImageDraw.Draw(canvas)
        cx, cy = width * 0.35, height * 0.5
        polys = [bar_polygon(cx, cy, 60, 10, 30 + rng.uniform(-10, 10)),  # a crossing pair
                 bar_polygon(cx, cy, 55, 10, 120 + rng.uniform(-10, 10))]
        for _ in range(2):  # two free bars on the right
            polys.append(bar_polygon(width * rng.uniform(0.65, 0.85), height * rng.uniform(0.25, 0.75),
                                     rng.uniform(25, 45), 9, rng.uniform(0, 180)))
        for poly in polys:
            draw.polygon(poly, fill=int(rng.integers(150, 230)))
        name = f"{split}_{image_id:03d}.png"
        canvas.save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for k, poly in enumerate(polys):
            bbox, area = polygon_bbox_area([poly], height, width)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "segmentation": [poly], "bbox": bbox, "area": area, "iscrowd": 0,
                                "overlapping": k < 2})
    return write_coco_split(root, split, images, annotations, [{"id": 1, "name": "chromosome"}])


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    """A read-only tiny dataset root with splits ``train`` (4 images) and ``val`` (2 images). Do not write into it."""
    root = tmp_path_factory.mktemp("tiny_coco")
    make_tiny_coco(root, "train", 4, seed=0)
    make_tiny_coco(root, "val", 2, seed=1)
    return root


@pytest.fixture
def bioimlab() -> Path:
    """The real BioImLab labelme data next to the project; the test is skipped when it is absent."""
    if not (BIOIMLAB / "labelme" / "train").is_dir():
        pytest.skip("real data ../shared/data/bioimlab is absent")
    return BIOIMLAB
