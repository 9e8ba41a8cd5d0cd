"""``predict.py``'s job: the checkpoint's model on image files, with pictures for people and JSON for programs.

What ``predict_files`` writes into the output folder:

- ``<stem>_pred.png`` per image: the image with coloured instance masks, boxes and ``<number>: <score>`` captions
  (``<number>: <label> <score>`` with more than one class); instances whose ``overlap_score`` (DaCSeg) reaches the
  overlap threshold get a red outline. A title strip names the file and counts the detections.
- ``<stem>_overlap_mask.png``, ``<stem>_overlap_edge.png``, ``<stem>_overlap_else_mask.png``,
  ``<stem>_overlap_else_edge.png`` (DaCSeg, when asked): grey 8-bit PNGs at the image's size, grey level
  ``round(255 * p)`` of the probability ``p``, the maximum over the image's kept detections.
- ``predictions.json`` and ``images.json`` (``train_utils.outputs.predictions``): only detections scoring at least
  the score threshold; ``image_id`` is the image's position in the expanded input list, from 1 (an image that could
  not be read, or not predicted in the memory there is, keeps its number, under ``failed``).
- with ``--crops DIR``, the karyotype crops (``train_utils.outputs.crops``).
- with ``--export FORMAT ...``, every detection as an editable outline for labelme, ImageJ/Fiji, QuPath or CVAT
  (``train_utils.outputs.exports``), traced from the final detections (after ``--tta``, whatever the stain).
- ``summary.csv``, one row per image for a spreadsheet (``train_utils.outputs.summary``); a failed image is marked.

``<stem>`` is the file name without suffix; when inputs share a stem, the folders that tell them apart are put in
front (``a__img``, ``b__img``) and, for one folder, the suffix behind (``img_png``, ``img_tif``), so no output
overwrites another.

The files are written on one thread, in image order, while the next image is predicted; an image's files are
complete once its line is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from errors import UserError, one_line
from my_dataset_chromosome import DatasetError, image_size, load_label_json, read_image
from network_files.config import ModelConfig
from network_files.dacseg import OVERLAP_MAP_KEYS
from train_utils import stain
from train_utils.cli import check_model_name, expand_inputs
from train_utils.engine.checkpoint import load_model_from_checkpoint
from train_utils.inference.detect import apply_speedups, default_speedups, detect, prepare_model
from train_utils.inference.exported import is_exported, load_exported_model
from train_utils.inference.tta import FlipTTA
from train_utils.masks import as_box_masks
from train_utils.outputs.crops import CROPS_JSON, crop_background, write_image_crops
from train_utils.outputs.exports import ExportImage, Exporter
from train_utils.outputs.files import check_output_dir, json_list_text, prepare_output_dir, write_text_atomic
from train_utils.outputs.predictions import (
    IMAGES_JSON,
    PREDICTIONS_JSON,
    ImagesIndex,
    PredictionsWriter,
    outputs_to_coco_results,
)
from train_utils.outputs.outlines import detection_outlines
from train_utils.outputs.summary import DEFAULT_EXPECTED_COUNT, SUMMARY_CSV, SummaryCsv
from train_utils.outputs.visualize import OVERLAY_LABELS, draw_instances


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
            raise UserError(
                f"{label_json_path} names labels {sorted(names)} but the model has {count} class(es): 1..{count}"
            )
    for label in range(1, count + 1):
        names.setdefault(label, f"class {label}")
    to_cat = {int(k): int(v) for k, v in (checkpoint.get("label_to_cat_id") or {}).items()}
    return names, {label: to_cat.get(label, label) for label in range(1, count + 1)}


def predict_image(model: torch.nn.Module, image: torch.Tensor, device: torch.device | str,
                  mask_thresh: float = 0.5, **detect_options: Any) -> tuple[dict[str, Any], float]:
    """``inference.detect`` on one ``[3, H, W]`` image; returns (its output on the CPU, its masks at their box size
    as ``train_utils.masks.BoxMasks``; seconds taken)."""
    device = torch.device(device)
    image = image.to(device)
    start = time.perf_counter()
    output = detect(model, [image], mask_thresh, **detect_options)[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {k: v.cpu() for k, v in output.items()}, time.perf_counter() - start


def overlapping_detections(output: Mapping[str, torch.Tensor], overlap_thresh: float = 0.5) -> torch.Tensor | None:
    """``[N]`` bool from ``overlap_scores`` (DaCSeg), None for a model without them."""
    scores = output.get("overlap_scores")
    return None if scores is None else scores >= overlap_thresh


def overlay(
    image: torch.Tensor,
    output: Mapping[str, Any],
    label_names: Mapping[int, str],
    overlap_thresh: float = 0.5,
    title: str | None = None,
    mask_thresh: float = 0.5,
    labels: str = "full",
) -> Image.Image:
    """The prediction picture: masks and overlapping instances outlined, with ``labels`` (``OVERLAY_LABELS``):
    ``full`` boxes and captions ``<number>: <score>`` (numbered from 1 in score order, as the karyotype crops),
    ``numbers`` the numbers alone without boxes, ``none`` the masks alone."""
    if labels not in OVERLAY_LABELS:
        raise ValueError(f"unknown overlay labels {labels!r}; choose one of {', '.join(OVERLAY_LABELS)}")
    scores = output["scores"].tolist()
    classes = output["labels"].tolist()
    if labels == "numbers":
        captions = [str(k) for k in range(1, len(scores) + 1)]
    elif len(label_names) > 1:
        captions = [f"{k}: {label_names.get(int(c), c)} {s:.2f}" for k, (c, s) in enumerate(zip(classes, scores), 1)]
    else:
        captions = [f"{k}: {s:.2f}" for k, s in enumerate(scores, 1)]
    masks = as_box_masks(output["masks"]).binary(mask_thresh)
    overlapping = overlapping_detections(output, overlap_thresh)
    boxes = output["boxes"] if labels == "full" else None
    return draw_instances(image, masks, boxes, captions if labels != "none" else None, overlapping, title=title)


def overlap_map_images(output: Mapping[str, torch.Tensor]) -> dict[str, Image.Image]:
    """Grey PNG-ready pictures of the four DaCSeg maps, each ``[H, W]`` (the max over detections, black without)."""
    return {
        key: Image.fromarray((output[key].clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")
        for key in OVERLAP_MAP_KEYS
    }


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the ways torch and Python report an allocation that failed (CPU or GPU)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


@dataclass
class CropOptions:
    """``predict.py --crops``: where the karyotype crops go and how they look (``train_utils.outputs.crops``)."""

    folder: Path
    background: str = "auto"
    margin: int = 8
    height: int | None = None


@dataclass
class PredictOptions:
    """How ``predict_files`` predicts and draws (the defaults are ``predict.py``'s)."""

    overlap_thresh: float = 0.5
    mask_thresh: float = 0.5
    save_overlap_maps: bool = False
    stain_mode: str = "as-is"
    model_polarity: str | None = None  # the checkpoint's (``train_utils.stain``)
    crops: CropOptions | None = None
    overlay_labels: str = "full"  # ``overlay``'s ``labels``
    export: tuple[str, ...] = ()  # ``train_utils.outputs.exports.EXPORT_FORMATS``
    review_below: float = 0.7  # exports flag, and summary.csv counts, detections scoring below it
    expected_count: int = DEFAULT_EXPECTED_COUNT  # summary.csv's count_flag (0: off)


@dataclass
class PredictionSummary:
    """What ``predict_files`` did: the ``images.json`` image entries, the failures and the detections kept."""

    images: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    num_detections: int = 0
    seconds: float = 0.0


def _read_ahead(paths: Sequence[Path]) -> Iterator[tuple[Path, Future]]:
    """Each path with the future of its decoded image; the next image is read while the current one is predicted."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read_image, paths[0]) if paths else None
        for index, path in enumerate(paths):
            current = pending
            pending = pool.submit(read_image, paths[index + 1]) if index + 1 < len(paths) else None
            yield path, current


def _predict_one(model, path: Path, image: torch.Tensor, image_id: int, stem: str, device,
                 options: PredictOptions) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """Predict one image (the model sees it in the checkpoint's polarity); returns (its ``images.json`` entry, the
    output, the counts caption)."""
    polarity = stain.detect_polarity(image)
    inverted = stain.needs_inversion(polarity, options.model_polarity, options.stain_mode)
    output, seconds = predict_image(model, stain.invert(image) if inverted else image, device, options.mask_thresh)
    overlapping = overlapping_detections(output, options.overlap_thresh)
    num = len(output["scores"])
    num_overlapping = int(overlapping.sum()) if overlapping is not None else 0
    counts = f"{num} detection{'s' if num != 1 else ''}"
    counts += f", {num_overlapping} overlapping" if overlapping is not None else ""
    counts += " (inverted for the model)" if inverted else ""
    entry = {"id": image_id, "file_name": str(path.resolve()), "width": int(image.shape[-1]),
             "height": int(image.shape[-2]), "stem": stem, "num_detections": num, "num_overlapping": num_overlapping,
             "inference_ms": round(seconds * 1000, 1), "polarity": polarity, "inverted": inverted}
    return entry, output, counts


def _skip_reason(exc: BaseException, path: Path) -> str | None:
    """Why an image is skipped: it could not be read, or not handled in the memory there is; None for an error that
    must stop the run."""
    if isinstance(exc, DatasetError):
        return str(exc)
    if is_out_of_memory(exc):
        return "not enough memory to predict this {}x{} image ({})".format(*image_size(path), one_line(exc))
    return None


class _Outputs:
    """The files and rows ``predict_files`` writes, image by image, in image order (on its writer thread)."""

    def __init__(self, output_dir: Path, crops_dir: Path | None, label_names: Mapping[int, str],
                 label_to_cat_id: Mapping[int, int], options: PredictOptions) -> None:
        self.output_dir, self.crops_dir, self.options = output_dir, crops_dir, options
        self.label_names, self.label_to_cat_id = label_names, label_to_cat_id
        self.summary, self.crop_entries = PredictionSummary(), []
        self.index = ImagesIndex(output_dir / IMAGES_JSON, label_names, label_to_cat_id)
        self.table = SummaryCsv(output_dir / SUMMARY_CSV, options.review_below, options.expected_count)
        self.exporter = Exporter(output_dir, options.export, label_names, label_to_cat_id) if options.export else None
        self.predictions = PredictionsWriter(output_dir / PREDICTIONS_JSON)

    def add(self, path: Path, stem: str, image: torch.Tensor, entry: dict[str, Any], output: dict[str, torch.Tensor],
            counts: str) -> None:
        """Write one predicted image's pictures, results, outlines and crops, record it and print its line (or skip
        it, when drawing it runs out of memory)."""
        try:
            self._write_files(path, stem, image, entry, output, counts)
        except (DatasetError, RuntimeError, MemoryError) as exc:
            reason = _skip_reason(exc, path)
            if reason is None:
                raise
            self.fail(entry["id"], path, stem, reason)
            return
        self.index.add(entry)
        self.table.add(entry, output["scores"].float().tolist(),
                       entry["num_overlapping"] if "overlap_scores" in output else None)
        self.summary.num_detections += entry["num_detections"]
        self.summary.seconds += entry["inference_ms"] / 1000
        tqdm.write(f"{path}: {counts}, {entry['inference_ms']:.0f} ms -> {stem}_pred.png")

    def fail(self, image_id: int, path: Path, stem: str, reason: str) -> None:
        """Record a skipped image and warn on stderr."""
        self.index.fail(image_id, path, reason)
        self.table.fail(image_id, path, stem, reason)
        tqdm.write(f"warning: skipped {path}: {reason}", file=sys.stderr)

    def close(self) -> None:
        self.predictions.close()

    def _write_files(self, path: Path, stem: str, image: torch.Tensor, entry: dict[str, Any],
                     output: dict[str, torch.Tensor], counts: str) -> None:
        options, image_id = self.options, entry["id"]
        overlay(image, output, self.label_names, options.overlap_thresh, f"{path.name}: {counts}", options.mask_thresh,
                options.overlay_labels).save(self.output_dir / f"{stem}_pred.png")
        if options.save_overlap_maps:
            for key, grey in overlap_map_images(output).items():
                grey.save(self.output_dir / f"{stem}_{key}.png")
        self.predictions.add(outputs_to_coco_results([output], [image_id], self.label_to_cat_id))
        if self.exporter is not None:
            self.exporter.add(ExportImage(path, stem, image_id, entry["width"], entry["height"]),
                              detection_outlines(output, self.label_names, self.label_to_cat_id, options.review_below,
                                                 options.overlap_thresh, options.mask_thresh))
        if self.crops_dir is not None:
            background = crop_background(options.crops.background, entry["polarity"])
            self.crop_entries += write_image_crops(image, output, image_id, path, stem, self.crops_dir, background,
                                                   options.crops.margin, options.crops.height)
            write_text_atomic(self.crops_dir / CROPS_JSON, json_list_text(self.crop_entries))


def _predict_or_skip(model, path: Path, reading: Future, image_id: int, stem: str, device,
                     outputs: _Outputs) -> Callable[[], None]:
    """Predict one image; returns what the writer thread is to do for it: write its files, or record it as skipped
    (unreadable, or too large for the memory)."""
    try:
        image = reading.result()
        entry, output, counts = _predict_one(model, path, image, image_id, stem, device, outputs.options)
        return partial(outputs.add, path, stem, image, entry, output, counts)
    except (DatasetError, RuntimeError, MemoryError) as exc:
        reason = _skip_reason(exc, path)
        if reason is None:
            raise
        return partial(outputs.fail, image_id, path, stem, reason)
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the next image must not wait for this one's memory


def _write_after(writer: ThreadPoolExecutor, previous: Future | None, write: Callable[[], None]) -> Future:
    """Submit ``write`` once the previous image's write is done (its error is raised here), so at most one image
    waits to be written."""
    if previous is not None:
        previous.result()
    return writer.submit(write)


def predict_files(model: torch.nn.Module, paths: Sequence[Path], output_dir: str | os.PathLike,
                  label_names: Mapping[int, str], label_to_cat_id: Mapping[int, int], device: torch.device | str = "cpu",
                  options: PredictOptions | None = None) -> PredictionSummary:
    """Predict every image, write the files listed in the module docstring and print one line per image.

    The model returns the detections to keep (``prepare_model`` sets its score threshold). The next image is read
    while one is predicted, and an image's files are written on one writer thread, in image order, while the next is
    predicted; an error in writing stops the run. An unreadable image, or one too large for the memory, is reported
    on stderr and skipped (listed under ``failed``); the others go on.
    """
    options = options or PredictOptions()
    try:
        if options.crops:  # checked before --output-dir is created: a refused run leaves nothing behind
            check_output_dir(options.crops.folder, "--crops")
        output_dir = prepare_output_dir(output_dir)
        crops_dir = prepare_output_dir(options.crops.folder, "--crops") if options.crops else None
    except OSError as exc:
        raise UserError(str(exc)) from None
    outputs = _Outputs(output_dir, crops_dir, label_names, label_to_cat_id, options)
    with contextlib.closing(outputs), ThreadPoolExecutor(max_workers=1) as writer:
        progress = tqdm(_read_ahead(paths), total=len(paths), desc="predict", unit="img", disable=None, file=sys.stderr)
        pending = None
        for image_id, ((path, reading), stem) in enumerate(zip(progress, output_stems(paths)), start=1):
            pending = _write_after(writer, pending,
                                   _predict_or_skip(model, path, reading, image_id, stem, device, outputs))
        if pending is not None:
            pending.result()
    summary = outputs.summary
    summary.images, summary.failed = outputs.index.images, outputs.index.failed
    return summary


def run_prediction(args: argparse.Namespace) -> tuple[PredictionSummary, int]:
    """``predict.py``'s job for parsed flags (``train_utils.cli.parse_predict_args``): returns the summary and the
    number of inputs. Raises ``DaCSegError`` (one line) for what a user can fix, before anything is written."""
    paths = expand_inputs(args.inputs)
    if "imagej" in args.export and importlib.util.find_spec("roifile") is None:
        raise UserError("--export imagej needs the roifile package: pip install roifile")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    if is_exported(args.weights_path):
        for flag, used in (("--save-overlap-maps", args.save_overlap_maps), ("--bf16", args.bf16),
                           ("--no-upscale", args.no_upscale), ("--openvino", args.openvino)):
            if used:
                raise UserError(f"{flag}: {args.weights_path} is an exported model, which runs as it was exported")
        model, config, checkpoint = load_exported_model(args.weights_path, args.threads)
        if torch.device(args.device).type != "cpu":
            print(f"note: {args.weights_path} runs with {model.backend} on the CPU, not on {args.device}", file=sys.stderr)
            device = "cpu"
    else:
        model, config, checkpoint = load_model_from_checkpoint(args.weights_path, device)
    check_model_name(args.model, config, args.weights_path)
    label_names, label_to_cat_id = label_maps(checkpoint, config, args.label_json_path)
    if args.save_overlap_maps and config.name != "dacseg":
        raise UserError(f"--save-overlap-maps needs a DaCSeg checkpoint; {args.weights_path} holds a {config.name} "
                        "model")
    try:
        for folder, flag in ((args.output_dir, "--output-dir"), (args.crops, "--crops")):
            if folder is not None:  # both checked, neither created: predict_files creates them
                check_output_dir(folder, flag)
    except OSError as exc:
        raise UserError(str(exc)) from None
    prepare_model(model, config, args.score_thresh, overlap_maps=args.save_overlap_maps)
    on_cpu = torch.device(device).type == "cpu"
    if args.openvino and not on_cpu:
        raise UserError(f"--openvino runs on the CPU; drop it or use --device cpu (not {device})")
    apply_speedups(model, replace(default_speedups(config, on_cpu), bf16=args.bf16, no_upscale=args.no_upscale,
                                  openvino=args.openvino))
    if args.tta:
        model = FlipTTA(model, score_thresh=args.score_thresh, mask_thresh=args.mask_thresh).eval()
    polarity = stain.checkpoint_polarity(checkpoint, args.weights_path, args.stain)
    crops = None if args.crops is None else CropOptions(Path(args.crops), args.crop_background, args.crop_margin,
                                                        args.crop_height)
    options = PredictOptions(args.overlap_thresh, args.mask_thresh, args.save_overlap_maps, args.stain, polarity, crops,
                             args.overlay_labels, tuple(args.export), args.review_below, args.expected_count)
    return predict_files(model, paths, args.output_dir, label_names, label_to_cat_id, device, options), len(paths)
