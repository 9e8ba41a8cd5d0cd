"""Pictures of instances: coloured masks, boxes, captions, and a distinct outline on overlapping instances.

Drawing is done by ``torchvision.utils.draw_segmentation_masks`` / ``draw_bounding_boxes``; this module only picks
colours that keep neighbouring chromosomes apart, blends the crossings (which torchvision paints black), places the
captions so that none hides another, sizes lines and text to the image, and computes the outline of overlapping
instances (the mask's max-pool dilation minus the mask). Masks are read at their box size
(``train_utils.masks.BoxMasks``) and pasted a band of rows at a time, only those that reach the band.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import box_iou
from torchvision.transforms.v2.functional import to_dtype, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from train_utils.masks import BoxMasks, as_box_masks

# Bright, well-separated colours with no reds or magentas: those are kept for the overlap outline.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 176, 0), (0, 200, 255), (124, 255, 0), (138, 92, 255), (0, 230, 160), (255, 230, 0), (61, 123, 255),
    (255, 140, 26), (0, 163, 163), (199, 125, 255), (47, 191, 47), (179, 134, 0), (102, 217, 255), (181, 230, 29),
    (0, 80, 200), (224, 160, 96), (0, 144, 96), (160, 160, 255), (107, 63, 160), (212, 255, 128),
)
OVERLAP_COLOR = (255, 0, 40)
OVERLAY_LABELS = ("full", "numbers", "none")  # what predict.py writes over the masks: boxes and captions, numbers, none
FONT_PATH = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"


def draw_instances(
    image: torch.Tensor,
    masks: BoxMasks | torch.Tensor,
    boxes: torch.Tensor | None = None,
    captions: Sequence[str] | None = None,
    overlapping: torch.Tensor | None = None,
    *,
    title: str | None = None,
    alpha: float = 0.45,
    min_side: int = 512,
) -> Image.Image:
    """Draw N instances on an image and return it as a PIL RGB image.

    Args:
        image: ``[3, H, W]`` (or ``[1, H, W]`` / ``[H, W]`` grey), float in 0..1 or uint8.
        masks: ``BoxMasks`` or ``[N, H, W]`` bool (``[N, 1, H, W]`` or probabilities are accepted: > 0.5).
        boxes: ``[N, 4]`` XYXY in pixels, drawn in the instance's colour; None draws no boxes.
        captions: N strings written at the top-left of each box (of the mask's box when ``boxes`` is None).
        overlapping: ``[N]`` bool; these instances get a thick outline in ``OVERLAP_COLOR``.
        title: a line written in a strip above the image (with a legend for the outline when any overlap).
        alpha: mask opacity; low enough that the banding stays visible.
        min_side: images whose longer side is below this are enlarged by an integer factor (nearest neighbour)
            so that lines and captions stay readable; 0 keeps the input size.

    Colours are deterministic: each instance takes the palette colour least used among its neighbours (boxes
    within a small margin), so touching chromosomes never share a colour while the palette lasts.
    """
    canvas = _to_uint8_rgb(image)
    height, width = canvas.shape[-2:]
    masks = _as_bool_masks(masks, height, width)
    num = len(masks)
    for name, value in (("boxes", boxes), ("captions", captions), ("overlapping", overlapping)):
        if value is not None and len(value) != num:
            raise ValueError(f"draw_instances: {num} masks but {len(value)} {name}")

    scale = math.ceil(min_side / max(height, width)) if max(height, width) < min_side else 1
    canvas, masks = _enlarged(canvas, scale), masks.enlarged(scale)
    long_side = max(height, width) * scale
    line_width = max(1, round(long_side / 700))
    font_size = min(20, max(10, round(long_side / 70)))

    if boxes is not None:
        boxes = boxes.detach().float().cpu().reshape(-1, 4) * scale
    placement = boxes if boxes is not None else masks.tight_boxes()
    colors = instance_colors(placement, margin=long_side / 40)

    if num:
        canvas = paint_masks(canvas, masks, colors, alpha)
    if overlapping is not None and bool(overlapping.any()):
        ring = overlap_outline(masks[overlapping.detach().cpu().bool()], radius=line_width + 1)
        for rows in row_bands(canvas.shape[-2], 48 * canvas.shape[-1]):  # torchvision blends in float
            canvas[:, rows] = draw_segmentation_masks(canvas[:, rows], ring[:, rows], alpha=1.0, colors=OVERLAP_COLOR)
    if num and boxes is not None:
        canvas = draw_bounding_boxes(canvas, boxes, colors=colors, width=line_width)
    picture = to_pil_image(canvas)
    if num and captions is not None:
        _write_captions(picture, placement, captions, colors, font_size)
    if title is not None:
        picture = _add_title(picture, title, font_size, show_legend=overlapping is not None and bool(overlapping.any()))
    return picture


def _enlarged(pixels: torch.Tensor, scale: int) -> torch.Tensor:
    """``[C, H, W]`` pixels repeated ``scale`` times along both image axes (nearest neighbour)."""
    return pixels if scale == 1 else pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The captions' font (DejaVu Sans Bold, shipped with matplotlib) at ``size`` px, else PIL's default at that size."""
    return ImageFont.truetype(str(FONT_PATH), size) if FONT_PATH.is_file() else ImageFont.load_default(size)


def _write_captions(picture: Image.Image, boxes: torch.Tensor, captions: Sequence[str],
                    colors: list[tuple[int, int, int]], font_size: int) -> None:
    """Captions on filled labels in each instance's colour, each label where it covers no earlier one
    (``place_labels``): in a metaphase the boxes crowd, and labels at one fixed corner of each box hide each other."""
    draw = ImageDraw.Draw(picture)
    font = label_font(font_size)
    pad = max(1, font_size // 8)
    sizes = []
    for caption in captions:
        _, _, right, bottom = draw.textbbox((0, 0), caption, font=font)
        sizes.append((right + 2 * pad, bottom + 2 * pad))
    for caption, color, (x, y), (w, h) in zip(captions, colors, place_labels(boxes, sizes, picture.size), sizes):
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=color)
        draw.text((x + pad, y + pad), caption, fill=_text_color(color), font=font)


def place_labels(boxes: torch.Tensor, sizes: Sequence[tuple[int, int]],
                 image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left corners of one ``(width, height)`` label per ``[N, 4]`` XYXY box, inside the ``(width, height)``
    image. In order, each label takes the first spot that covers no earlier label: inside the box's top-left
    corner, above the box, below it, inside its bottom-left corner, right of it, left of it; when every spot covers
    one, the spot that covers the least."""
    image_width, image_height = image_size
    placed: list[tuple[int, int, int, int]] = []
    corners = []
    for (x0, y0, x1, y1), (w, h) in zip(boxes.round().int().tolist(), sizes):
        spots = [(x0, y0), (x0, y0 - h), (x0, y1), (x0, y1 - h), (x1, y0), (x0 - w, y0)]
        best, least = (0, 0), None
        for x, y in spots:
            x, y = min(max(x, 0), max(image_width - w, 0)), min(max(y, 0), max(image_height - h, 0))
            covered = sum(max(0, min(x + w, b[2]) - max(x, b[0])) * max(0, min(y + h, b[3]) - max(y, b[1]))
                          for b in placed)
            if least is None or covered < least:
                best, least = (x, y), covered
            if covered == 0:
                break
        placed.append((best[0], best[1], best[0] + w, best[1] + h))
        corners.append(best)
    return corners


def instance_colors(boxes: torch.Tensor, margin: float = 10.0) -> list[tuple[int, int, int]]:
    """One palette colour per box: greedily the colour least used by already coloured neighbours, then overall."""
    num = boxes.shape[0]
    if num == 0:
        return []
    grown = boxes.float() + torch.tensor([-margin, -margin, margin, margin])
    neighbours = box_iou(grown, grown) > 0
    chosen: list[int] = []
    usage = [0] * len(PALETTE)
    for i in range(num):
        clash = [0] * len(PALETTE)
        for j, c in enumerate(chosen):
            if neighbours[i, j]:
                clash[c] += 1
        best = min(range(len(PALETTE)), key=lambda c: (clash[c], usage[c], c))
        chosen.append(best)
        usage[best] += 1
    return [PALETTE[c] for c in chosen]


def paint_masks(canvas: torch.Tensor, masks: BoxMasks, colors: list[tuple[int, int, int]],
                alpha: float) -> torch.Tensor:
    """``draw_segmentation_masks`` of every mask on the uint8 ``[3, H, W]`` canvas, a band of rows at a time with the
    masks that reach the band pasted into it: the pixels of one call with all masks at the image's size."""
    height, width = canvas.shape[-2:]
    regions = masks.regions.tolist()
    for rows in row_bands(height, (8 * len(masks) + 48) * width):  # torchvision sums masks in int64, blends in float
        band = (0, rows.start, width, rows.stop)
        reach = [k for k, (_, top, _, bottom) in enumerate(regions) if top < rows.stop and bottom > rows.start]
        pasted = [masks.crop(k, band) for k in reach]
        if not reach:  # an empty mask: the band is still blended, as in one call with every mask
            reach, pasted = [0], [torch.zeros((rows.stop - rows.start, width), dtype=torch.bool)]
        stack, band_colors = torch.stack(pasted), [colors[k] for k in reach]
        painted = draw_segmentation_masks(canvas[:, rows], stack, alpha=alpha, colors=band_colors)  # a new tensor
        _blend_crossings(painted, canvas[:, rows], stack, band_colors, alpha)
        canvas[:, rows] = painted
    return canvas


def _blend_crossings(painted: torch.Tensor, original: torch.Tensor, stack: torch.Tensor,
                     colors: list[tuple[int, int, int]], alpha: float) -> None:
    """Where masks overlap, torchvision paints black; a crossing is what a cytogeneticist looks at, so there the
    mean colour of the masks is blended in as everywhere else, and the banding stays visible."""
    counts = stack.sum(dim=0)
    crossing = counts > 1
    if not crossing.any():
        return
    covering = stack[:, crossing].float()  # [N, P]: which masks cover each crossing pixel
    mean = torch.tensor(colors, dtype=torch.float32).T @ covering / counts[crossing]  # [3, P]
    painted[:, crossing] = (original[:, crossing] * (1 - alpha) + mean * alpha).to(painted.dtype)


def overlap_outline(masks: BoxMasks | torch.Tensor, radius: int = 2) -> torch.Tensor:
    """``[1, H, W]`` bool: union of each mask's outer contour, ``radius`` px wide (max-pool dilation minus the mask),
    so the instance's own colour and banding stay visible inside. ``masks``: ``BoxMasks`` or ``[N, H, W]`` bool."""
    masks = as_box_masks(masks)
    height, width = masks.size
    ring = torch.zeros((1, height, width), dtype=torch.bool)
    for patch, (x0, y0, x1, y1) in zip(masks.patches, masks.regions.tolist()):
        if not patch.any():
            continue
        grown = F.pad(patch.cpu().bool(), (radius,) * 4)  # the region and `radius` pixels around it
        dilated = F.max_pool2d(grown[None, None].float(), 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0
        left, top = x0 - radius, y0 - radius
        inside = (slice(max(top, 0), min(y1 + radius, height)), slice(max(left, 0), min(x1 + radius, width)))
        ring[0][inside] |= (dilated & ~grown)[inside[0].start - top:inside[0].stop - top,
                                              inside[1].start - left:inside[1].stop - left]
    return ring


def row_bands(height: int, bytes_per_row: int, budget: int = 256 * 2**20) -> list[slice]:
    """Slices of rows holding about ``budget`` bytes each, so per-pixel work on a huge image stays bounded."""
    step = max(1, budget // max(1, bytes_per_row))
    return [slice(top, min(height, top + step)) for top in range(0, height, step)]


def _to_uint8_rgb(image: torch.Tensor) -> torch.Tensor:
    image = image.detach().cpu()
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"draw_instances: image must be [3, H, W], [1, H, W] or [H, W], got {list(image.shape)}")
    image = image[:3] if image.shape[0] != 1 else image.expand(3, -1, -1)
    if image.dtype != torch.uint8:
        image = to_dtype(image.float().clamp(0, 1), torch.uint8, scale=True)
    return image.contiguous()


def _as_bool_masks(masks: BoxMasks | torch.Tensor, height: int, width: int) -> BoxMasks:
    if not isinstance(masks, BoxMasks):
        masks = masks.detach().cpu()
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.ndim == 2 and masks.numel() == 0:
            masks = masks.reshape(0, height, width)
        if masks.ndim != 3 or masks.shape[-2:] != (height, width):
            raise ValueError(f"draw_instances: masks must be [N, {height}, {width}], got {list(masks.shape)}")
    masks = as_box_masks(masks)
    if masks.size != (height, width):
        raise ValueError(f"draw_instances: masks of a {masks.size[1]}x{masks.size[0]} image on a {width}x{height} one")
    return masks.cpu().binary(0.5)


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _add_title(picture: Image.Image, title: str, font_size: int, show_legend: bool) -> Image.Image:
    """A dark strip above the picture with the title, and on the right the overlap-outline legend."""
    font = label_font(font_size)
    strip = round(font_size * 1.8)
    framed = Image.new("RGB", (picture.width, picture.height + strip), (24, 24, 24))
    framed.paste(picture, (0, strip))
    draw = ImageDraw.Draw(framed)
    pad = (strip - font_size) // 2
    draw.text((pad, pad), title, fill=(255, 255, 255), font=font)
    if show_legend:
        legend = "overlapping"
        text_width = draw.textlength(legend, font=font)
        x = picture.width - pad - text_width
        draw.text((x, pad), legend, fill=(255, 255, 255), font=font)
        side = font_size
        draw.rectangle((x - pad - side, pad, x - pad, pad + side), outline=OVERLAP_COLOR, width=max(2, side // 6))
    return framed
