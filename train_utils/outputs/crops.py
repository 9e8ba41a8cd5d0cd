"""Karyotype crops: each detected chromosome cut out with its mask, turned upright along its principal axis, on a
clean background, at the original pixel scale; and a contact sheet of one cell's crops sorted by length.

What ``predict.py --crops DIR`` writes (``write_image_crops``):

- ``DIR/<stem>_<k>.png``: detection ``k`` of the image (numbered from 1 in score order, as in the overlay), its
  longest dimension vertical. Pixels outside the mask are the background colour. A crossing chromosome keeps its
  whole (amodal) mask, so the chromosome it crosses shows through where they overlap.
- ``DIR/<stem>_sheet.png``: every crop of the image in one grid, longest first, each under its number.
- ``DIR/crops.json``: a JSON list, one entry per crop and line (see ``crop_entry``), rewritten after every image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from train_utils.masks import as_box_masks
from train_utils.outputs.visualize import label_font

CROP_BACKGROUNDS = ("auto", "white", "black")
CROPS_JSON = "crops.json"


@dataclass
class Crop:
    """One upright chromosome: the picture and what was measured on its mask."""

    picture: Image.Image
    angle_deg: float  # counter-clockwise rotation applied to the image to make the chromosome upright
    length_px: int  # the upright mask's height (before any --crop-height scaling)
    area_px: int
    bbox: list[int]  # the mask's box in the source image, x y w h


def upright_angle(mask: np.ndarray) -> float:
    """Degrees (counter-clockwise, as ``PIL.Image.rotate``) that turn the mask's principal axis vertical, in
    (-90, 90]; 0 for a mask of fewer than two pixels."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 2:
        return 0.0
    coords = np.stack([xs - xs.mean(), ys - ys.mean()]).astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(coords @ coords.T)
    vx, vy = eigenvectors[:, int(np.argmax(eigenvalues))]
    angle = 90.0 + math.degrees(math.atan2(vy, vx))  # y points down: the axis is -atan2 counter-clockwise from x
    angle = (angle + 90.0) % 180.0 - 90.0
    return 90.0 if angle == -90.0 else angle


def make_crop(image: np.ndarray, mask: np.ndarray, background: tuple[int, int, int], margin: int = 8,
              height: int | None = None, origin: tuple[int, int] = (0, 0)) -> Crop:
    """Cut ``mask`` out of ``image`` (uint8 ``[H, W, 3]``), turn it upright and frame it with ``margin`` pixels.
    ``mask`` covers the image from pixel ``origin`` (x, y) on: the whole image, or a detection's box.

    ``height`` scales the crop to that many pixels high (keeping its aspect); otherwise it keeps the image's scale.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("make_crop: the mask is empty")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    patch = image[origin[1] + y0:origin[1] + y1, origin[0] + x0:origin[0] + x1].copy()
    inside = mask[y0:y1, x0:x1]
    patch[~inside] = background
    angle = upright_angle(inside)
    turned = Image.fromarray(patch).rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=background)
    turned_mask = np.asarray(Image.fromarray(inside.astype(np.uint8) * 255).rotate(
        angle, resample=Image.BILINEAR, expand=True, fillcolor=0)) > 127
    rows, cols = np.nonzero(turned_mask)
    if len(rows):  # a one-pixel-wide mask can vanish in the resampling; keep the whole turned patch then
        turned = turned.crop((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    framed = Image.new("RGB", (turned.width + 2 * margin, turned.height + 2 * margin), background)
    framed.paste(turned, (margin, margin))
    length = turned.height
    if height is not None:
        framed = framed.resize((max(1, round(framed.width * height / framed.height)), height), Image.BILINEAR)
    return Crop(framed, round(angle, 2), int(length), int(inside.sum()),
                [int(origin[0] + x0), int(origin[1] + y0), int(x1 - x0), int(y1 - y0)])


def crop_background(choice: str, polarity: str) -> tuple[int, int, int]:
    """``white`` / ``black``, or for ``auto`` the image's own field: white behind dark-on-bright (G-band) images."""
    if choice not in CROP_BACKGROUNDS:
        raise ValueError(f"unknown crop background {choice!r}; choose one of {', '.join(CROP_BACKGROUNDS)}")
    white = choice == "white" or (choice == "auto" and polarity == "dark-on-bright")
    return (255, 255, 255) if white else (0, 0, 0)


def contact_sheet(crops: Sequence[tuple[int, Crop]], background: tuple[int, int, int], title: str) -> Image.Image:
    """The ``(number, crop)`` pairs in a grid, longest first, each numbered, under a title strip."""
    font_size = 14
    font = label_font(font_size)
    ordered = sorted(crops, key=lambda item: (-item[1].length_px, item[0]))
    label_height = font_size + 6
    strip = font_size * 2
    if not ordered:
        sheet = Image.new("RGB", (400, strip + 40), background)
    else:
        cell_w = max(max(c.picture.width for _, c in ordered), 3 * font_size)
        cell_h = max(c.picture.height for _, c in ordered) + label_height
        columns = max(1, min(len(ordered), math.ceil(math.sqrt(len(ordered) * 2))))
        rows = math.ceil(len(ordered) / columns)
        sheet = Image.new("RGB", (columns * cell_w, strip + rows * cell_h), background)
    draw = ImageDraw.Draw(sheet)
    ink = (0, 0, 0) if background == (255, 255, 255) else (255, 255, 255)
    draw.rectangle((0, 0, sheet.width, strip), fill=(24, 24, 24))
    draw.text((6, (strip - font_size) // 2), title, fill=(255, 255, 255), font=font)
    for slot, (number, crop) in enumerate(ordered):
        x, y = (slot % columns) * cell_w, strip + (slot // columns) * cell_h
        draw.text((x + 4, y + 2), str(number), fill=ink, font=font)
        sheet.paste(crop.picture, (x + (cell_w - crop.picture.width) // 2, y + label_height))
    return sheet


def crop_entry(image_id: int, source: Path, number: int, crop_file: str, crop: Crop, score: float,
               overlap_score: float | None) -> dict[str, Any]:
    """One ``crops.json`` entry."""
    entry: dict[str, Any] = {
        "image_id": image_id, "source": str(source.resolve()), "detection": number, "crop_file": crop_file,
        "score": round(score, 5), "angle_deg": crop.angle_deg, "length_px": crop.length_px, "area_px": crop.area_px,
        "bbox": crop.bbox,
    }
    if overlap_score is not None:
        entry["overlap_score"] = round(overlap_score, 5)
    return entry


def write_image_crops(image: torch.Tensor, output: Mapping[str, Any], image_id: int, source: Path,
                      stem: str, crops_dir: Path, background: tuple[int, int, int], margin: int = 8,
                      height: int | None = None) -> list[dict[str, Any]]:
    """Write one image's crops and contact sheet into ``crops_dir``; returns their ``crops.json`` entries.
    ``output["masks"]``: ``train_utils.masks.BoxMasks`` or ``[N, 1, H, W]``, bool (or probabilities, > 0.5)."""
    rgb = (image.detach().float().clamp(0, 1)[:3].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    overlap = output.get("overlap_scores")
    masks = as_box_masks(output["masks"]).cpu().binary(0.5)
    entries, crops = [], []
    for k, (patch, (x0, y0, _, _)) in enumerate(zip(masks.patches, masks.regions.tolist())):
        mask = patch.numpy()
        if not mask.any():
            continue
        crop = make_crop(rgb, mask, background, margin, height, origin=(x0, y0))
        name = f"{stem}_{k + 1:03d}.png"
        crop.picture.save(crops_dir / name)
        crops.append((k + 1, crop))
        entries.append(crop_entry(image_id, source, k + 1, name, crop, float(output["scores"][k]),
                                  None if overlap is None else float(overlap[k])))
    contact_sheet(crops, background, f"{source.name}: {len(crops)} crop(s), longest first").save(
        crops_dir / f"{stem}_sheet.png")
    return entries
