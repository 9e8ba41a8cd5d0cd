"""Prediction on image files: expanding the inputs, running a model, writing overlays, overlap maps and JSON.

What ``predict_files`` writes into the output folder:

- ``<stem>_pred.png`` per image: the image with coloured instance masks, boxes and ``<score>`` captions
  (``<label> <score>`` with more than one class); instances whose ``overlap_score`` (DaCSeg) reaches the overlap
  threshold get a red outline. A title strip names the file and counts the detections.
- ``<stem>_overlap_mask.png``, ``<stem>_overlap_edge.png``, ``<stem>_overlap_else_mask.png``,
  ``<stem>_overlap_else_edge.png`` (DaCSeg, when asked): grey 8-bit PNGs at the image's size, grey level
  ``round(255 * p)`` of the probability ``p``, the maximum over the image's kept detections.
- ``predictions.json``: a COCO results list (what ``COCO.loadRes`` and ``validation.py --results-json`` read), one
  detection per line: ``image_id``, ``category_id``, ``bbox`` (xywh), ``score``, ``segmentation`` (compressed RLE)
  and, for DaCSeg, ``overlap_score``. Only detections scoring at least the score threshold are kept.
- ``images.json``: maps ``image_id`` back to the files, as COCO ``images``/``categories`` sections:
  ``{"images": [{"id", "file_name", "width", "height", "stem", "num_detections", "num_overlapping",
  "inference_ms", "polarity", "inverted"}], "categories": [{"id", "name"}], "failed": [{"id", "file_name",
  "error"}]}``; ``file_name`` is the image's absolute path, ``polarity`` the image's own stain polarity
  (``bright-on-dark`` or ``dark-on-bright``) and ``inverted`` whether the model saw it inverted (``--stain``).
  ``image_id`` is the image's position in the expanded input list, from 1 (an image that could not be read, or not
  predicted in the memory there is, keeps its number, under ``failed``). Both JSON files are complete after every image, so a run that is stopped keeps what it did.

``<stem>`` is the file name without suffix; when inputs share a stem, the folders that tell them apart are put in
front (``a__img``, ``b__img``) and, for one folder, the suffix behind (``img_png``, ``img_tif``), so no output
overwrites another.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes
from tqdm import tqdm

from my_dataset_chromosome import DatasetError, image_size, load_label_json, read_image
from network_files.config import ModelConfig
from network_files.dacseg import OVERLAP_MAP_KEYS
from train_utils import stain
from train_utils.cli import one_line
from train_utils.inference.tta import FlipTTA
from train_utils.outputs.crops import CROPS_JSON, crop_background, write_image_crops
from train_utils.outputs.predictions import outputs_to_coco_results
from train_utils.outputs.results import prepare_output_dir, replace_file
from train_utils.outputs.visualize import draw_instances

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class InferenceError(ValueError):
    """Bad prediction input (a pattern matching nothing, an impossible option); one line naming the culprit."""


def expand_inputs(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Image paths from files, folders (their images, not recursive, hidden files skipped) and globs, in order,
    without duplicates. A named file is taken whatever its suffix; folders and globs keep ``IMAGE_SUFFIXES`` only."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            found.append(path)
            continue
        if path.is_dir():
            images = _folder_images(path)
            if not images:
                raise InferenceError(f"folder {path} holds no images ({' '.join(IMAGE_SUFFIXES)})")
            found.extend(images)
            continue
        hits = sorted(glob.glob(str(pattern), recursive=True))
        if not hits:
            raise InferenceError(f"input {str(pattern)!r} matches no file or folder")
        images = []
        for hit in map(Path, hits):
            images.extend(_folder_images(hit) if hit.is_dir() else [hit] if _is_image(hit) else [])
        if not images:
            suffixes = " ".join(IMAGE_SUFFIXES)
            raise InferenceError(f"input {str(pattern)!r} matches {len(hits)} path(s) but no images ({suffixes})")
        found.extend(images)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p))


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct output name per input (case-insensitively, for macOS and Windows disks); see the module docstring."""
    resolved = [Path(p).resolve() for p in paths]
    names = [p.stem for p in resolved]
    clashes = Counter(n.lower() for n in names)
    for key in [k for k, count in clashes.items() if count > 1]:
        group = [i for i, n in enumerate(names) if n.lower() == key]
        common = Path(os.path.commonpath([resolved[i].parent for i in group]))
        for i in group:
            names[i] = "__".join([*resolved[i].parent.relative_to(common).parts, resolved[i].stem])
    clashes = Counter(n.lower() for n in names)
    names = [f"{n}_{p.suffix.lstrip('.').lower()}" if clashes[n.lower()] > 1 else n for n, p in zip(names, resolved)]
    used: set[str] = set()
    for i, name in enumerate(names):  # whatever is left (names differing only in case): number them
        candidate, k = name, 1
        while candidate.lower() in used:
            k += 1
            candidate = f"{name}-{k}"
        names[i] = candidate
        used.add(candidate.lower())
    return names


def label_maps(
    checkpoint: Mapping[str, Any], config: ModelConfig, label_json_path: str | os.PathLike | None = None
) -> tuple[dict[int, str], dict[int, int]]:
    """``(label_names, label_to_cat_id)`` from the checkpoint; a label JSON, when given, renames the classes."""
    count = config.num_classes
    names = {int(k): str(v) for k, v in (checkpoint.get("label_names") or {}).items()}
    if label_json_path is not None:
        names = load_label_json(label_json_path)
        if sorted(names) != list(range(1, count + 1)):
            raise InferenceError(
                f"{label_json_path} names labels {sorted(names)} but the model has {count} class(es): 1..{count}"
            )
    for label in range(1, count + 1):
        names.setdefault(label, f"class {label}")
    to_cat = {int(k): int(v) for k, v in (checkpoint.get("label_to_cat_id") or {}).items()}
    return names, {label: to_cat.get(label, label) for label in range(1, count + 1)}


def prepare_model(model: torch.nn.Module, config: ModelConfig, score_thresh: float, overlap_maps: bool = False) -> None:
    """Let the model return exactly the detections scoring at least ``score_thresh`` (so nothing below it is ever
    pasted at full size) and, for DaCSeg, the auxiliary maps when asked."""
    if overlap_maps and config.name != "dacseg":
        raise InferenceError(f"overlap maps need a DaCSeg checkpoint; this one holds a {config.name} model")
    model.roi_heads.score_thresh = float(score_thresh)
    if config.name == "dacseg":
        model.roi_heads.return_overlap_maps = overlap_maps


PASTE_BYTES = 256 * 2**20  # float memory for pasting masks at once; an image then needs ~N bytes per pixel on top


@torch.inference_mode()
def predict_image(
    model: torch.nn.Module, image: torch.Tensor, device: torch.device | str, mask_thresh: float = 0.5,
    paste_bytes: int = PASTE_BYTES,
) -> tuple[dict[str, torch.Tensor], float]:
    """Run the model on one ``[3, H, W]`` image; returns (its output on the CPU, seconds taken).

    The steps of ``GeneralizedRCNN.forward``, but the masks are pasted by ``paste_detections``: ``masks`` come back
    ``[N, 1, H, W]`` bool and DaCSeg's overlap maps (when asked) ``[H, W]``, the maximum over detections.
    """
    device = torch.device(device)
    image = image.to(device)
    start = time.perf_counter()
    if isinstance(model, FlipTTA):  # four views merged at full size (see train_utils.inference.tta)
        output = model([image])[0]
        output["masks"] = output["masks"] > mask_thresh
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {k: v.cpu() for k, v in output.items()}, time.perf_counter() - start
    batch, _ = model.transform([image])
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features)
    detections = model.roi_heads(features, proposals, batch.image_sizes)[0][0]
    size = (int(image.shape[-2]), int(image.shape[-1]))
    detections["boxes"] = resize_boxes(detections["boxes"], batch.image_sizes[0], size)
    output = paste_detections(detections, size, mask_thresh, paste_bytes)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {k: v.cpu() for k, v in output.items()}, seconds


def paste_detections(
    detections: Mapping[str, torch.Tensor], size: tuple[int, int], mask_thresh: float = 0.5,
    paste_bytes: int = PASTE_BYTES,
) -> dict[str, torch.Tensor]:
    """Paste ``[N, 1, M, M]`` RoI masks (boxes already at ``size``) a few at a time, within ``paste_bytes`` of float:
    ``masks`` becomes ``[N, 1, H, W]`` bool (probability > ``mask_thresh``), each overlap map ``[H, W]`` max over N."""
    out = dict(detections)
    boxes = detections["boxes"]
    chunk = max(1, paste_bytes // (4 * size[0] * size[1]))
    pieces = [slice(i, i + chunk) for i in range(0, len(boxes), chunk)]
    if "masks" in detections:
        masks = detections["masks"]
        out["masks"] = torch.empty((len(boxes), 1, *size), dtype=torch.bool, device=masks.device)
        for p in pieces:  # filled in place: a list of pieces and their concatenation would hold every mask twice
            out["masks"][p] = paste_masks_in_image(masks[p], boxes[p], size) > mask_thresh
    for key in OVERLAP_MAP_KEYS:
        if key in detections:
            best = torch.zeros(size, device=boxes.device)
            for p in pieces:
                best = torch.maximum(best, paste_masks_in_image(detections[key][p], boxes[p], size)[:, 0].amax(dim=0))
            out[key] = best
    return out


def overlapping_detections(output: Mapping[str, torch.Tensor], overlap_thresh: float = 0.5) -> torch.Tensor | None:
    """``[N]`` bool from ``overlap_scores`` (DaCSeg), None for a model without them."""
    scores = output.get("overlap_scores")
    return None if scores is None else scores >= overlap_thresh


def overlay(
    image: torch.Tensor,
    output: Mapping[str, torch.Tensor],
    label_names: Mapping[int, str],
    overlap_thresh: float = 0.5,
    title: str | None = None,
    mask_thresh: float = 0.5,
) -> Image.Image:
    """The prediction picture: masks, boxes, captions ``<number>: <score>`` (numbered from 1 in score order, as the
    karyotype crops), overlapping instances outlined."""
    scores = output["scores"].tolist()
    labels = output["labels"].tolist()
    if len(label_names) > 1:
        captions = [f"{k}: {label_names.get(int(lab), lab)} {s:.2f}" for k, (lab, s) in enumerate(zip(labels, scores), 1)]
    else:
        captions = [f"{k}: {s:.2f}" for k, s in enumerate(scores, 1)]
    masks = output["masks"][:, 0]
    masks = masks if masks.dtype == torch.bool else masks > mask_thresh
    overlapping = overlapping_detections(output, overlap_thresh)
    return draw_instances(image, masks, output["boxes"], captions, overlapping, title=title)


def overlap_map_images(output: Mapping[str, torch.Tensor]) -> dict[str, Image.Image]:
    """Grey PNG-ready pictures of the four DaCSeg maps, each ``[H, W]`` (the max over detections, black without)."""
    return {
        key: Image.fromarray((output[key].clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")
        for key in OVERLAP_MAP_KEYS
    }


class PredictionsWriter:
    """``predictions.json`` written as it grows: a JSON list, one COCO result object per line, closed after every
    ``add``, so a crash or a kill keeps every image already predicted."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.file = open(path, "wb")
        self.body_end, self.count = 1, 0  # the closing "]" starts after the "["
        self.file.write(b"[]\n")
        self.file.flush()

    def add(self, results: Sequence[Mapping[str, Any]]) -> None:
        if not results:
            return
        self.file.seek(self.body_end)
        self.file.write((",\n" if self.count else "\n").encode() + _json_lines(results).encode())
        self.body_end, self.count = self.file.tell(), self.count + len(results)
        self.file.write(b"\n]\n")
        self.file.truncate()
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _json_lines(items: Sequence[Mapping[str, Any]]) -> str:
    return ",\n".join(json.dumps(item, separators=(", ", ": ")) for item in items)


def json_list_text(items: Sequence[Mapping[str, Any]]) -> str:
    """A JSON list with one object per line (the layout of ``predictions.json`` and ``crops.json``)."""
    return f"[\n{_json_lines(items)}\n]\n" if items else "[]\n"


def write_predictions(results: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """``predictions.json`` in one go (the format of ``PredictionsWriter``)."""
    Path(path).write_text(json_list_text(results))


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the ways torch and Python report an allocation that failed (CPU or GPU)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _predict_and_draw(model, image, device, path: Path, prefix: Path, label_names, overlap_thresh: float,
                      mask_thresh: float, save_overlap_maps: bool,
                      inverted: bool = False) -> tuple[dict[str, torch.Tensor], float, str, int]:
    """Predict one image (the model sees it inverted when asked) and write its pictures on the image as it is;
    returns (output, seconds, the counts caption, the number predicted overlapping)."""
    output, seconds = predict_image(model, stain.invert(image) if inverted else image, device, mask_thresh)
    overlapping = overlapping_detections(output, overlap_thresh)
    num = len(output["scores"])
    num_overlapping = int(overlapping.sum()) if overlapping is not None else 0
    counts = f"{num} detection{'s' if num != 1 else ''}"
    if overlapping is not None:
        counts += f", {num_overlapping} overlapping"
    if inverted:
        counts += " (inverted for the model)"
    picture = overlay(image, output, label_names, overlap_thresh, f"{path.name}: {counts}", mask_thresh)
    picture.save(f"{prefix}_pred.png")
    if save_overlap_maps:
        for key, grey in overlap_map_images(output).items():
            grey.save(f"{prefix}_{key}.png")
    return output, seconds, counts, num_overlapping


@dataclass
class CropOptions:
    """``predict.py --crops``: where the karyotype crops go and how they look (``train_utils.outputs.crops``)."""

    folder: Path
    background: str = "auto"
    margin: int = 8
    height: int | None = None


@dataclass
class PredictionSummary:
    """What ``predict_files`` did: the ``images.json`` image entries, the failures and the detections kept."""

    images: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    num_detections: int = 0
    seconds: float = 0.0


def predict_files(
    model: torch.nn.Module,
    paths: Sequence[Path],
    output_dir: str | os.PathLike,
    label_names: Mapping[int, str],
    label_to_cat_id: Mapping[int, int],
    device: torch.device | str = "cpu",
    overlap_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    save_overlap_maps: bool = False,
    stain_mode: str = "as-is",
    model_polarity: str | None = None,
    weights_path: str | os.PathLike = "the checkpoint",
    crops: CropOptions | None = None,
) -> PredictionSummary:
    """Predict every image, write the files listed in the module docstring and print one line per image.

    The model returns the detections to keep (``prepare_model`` sets its score threshold). Each image is brought to ``model_polarity`` as ``stain_mode`` says (``train_utils.stain``) before the model sees
    it; its picture is drawn on the image as it was. An unreadable image, or one too large for the memory, is
    reported on stderr and skipped (listed under ``failed``); the others go on. Both JSON files are complete after
    every image, so an interrupted run keeps what it did.
    """
    try:
        output_dir = prepare_output_dir(output_dir)
    except OSError as exc:
        raise InferenceError(str(exc)) from None
    crop_entries: list[dict[str, Any]] = []
    if crops is not None:
        try:
            crops_dir = prepare_output_dir(crops.folder, "--crops")
        except OSError as exc:
            raise InferenceError(str(exc)) from None
    if model_polarity is None and stain_mode == "auto":
        print(stain.old_checkpoint_note(weights_path), file=sys.stderr)
    summary = PredictionSummary()
    predictions = PredictionsWriter(output_dir / "predictions.json")
    categories = [{"id": int(label_to_cat_id[k]), "name": label_names[k]} for k in sorted(label_names)]

    def write_index() -> None:
        index = {"images": summary.images, "categories": categories, "failed": summary.failed}
        replace_file(output_dir / "images.json", json.dumps(index, indent=1) + "\n")

    def skip(image_id: int, path: Path, error: str) -> None:
        summary.failed.append({"id": image_id, "file_name": str(path.resolve()), "error": error})
        tqdm.write(f"warning: skipped {path}: {error}", file=sys.stderr)
        write_index()

    write_index()
    stems = output_stems(paths)
    progress = tqdm(list(zip(paths, stems)), desc="predict", unit="img", disable=None, file=sys.stderr)
    for image_id, (path, stem) in enumerate(progress, start=1):
        try:
            image = read_image(path)
            height, width = image.shape[-2:]
            polarity = stain.detect_polarity(image)
            inverted = stain.needs_inversion(polarity, model_polarity, stain_mode)
            output, seconds, counts, num_overlapping = _predict_and_draw(
                model, image, device, path, output_dir / stem, label_names, overlap_thresh, mask_thresh,
                save_overlap_maps, inverted)
            predictions.add(outputs_to_coco_results([output], [image_id], label_to_cat_id, mask_thresh))
            if crops is not None:
                background = crop_background(crops.background, polarity)
                crop_entries += write_image_crops(image, output, image_id, path, stem, crops_dir, background,
                                                  crops.margin, crops.height)
                replace_file(crops_dir / CROPS_JSON, json_list_text(crop_entries))
        except DatasetError as exc:
            skip(image_id, path, str(exc))
            continue
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            width, height = image_size(path)
            skip(image_id, path, f"not enough memory to predict this {width}x{height} image ({one_line(exc)})")
            continue
        finally:
            image = None  # the next image must not wait for this one's memory
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        num = len(output["scores"])
        summary.images.append({
            "id": image_id, "file_name": str(path.resolve()), "width": int(width), "height": int(height), "stem": stem,
            "num_detections": num, "num_overlapping": num_overlapping, "inference_ms": round(seconds * 1000, 1),
            "polarity": polarity, "inverted": inverted,
        })
        write_index()
        summary.num_detections += num
        summary.seconds += seconds
        tqdm.write(f"{path}: {counts}, {seconds * 1000:.0f} ms -> {stem}_pred.png")
    predictions.close()
    return summary
