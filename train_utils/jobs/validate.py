"""``validation.py``: score a checkpoint, or an existing COCO results file, on a dataset split.

With ``--weights-path`` the model is rebuilt from the checkpoint alone and run over the split; with ``--results-json``
the detections of any tool (``predict.py``'s ``predictions.json`` included) are scored without a model. Both end in
``train_utils.evaluation.coco_eval.evaluate_results`` and ``train_utils.outputs.record.write_record``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from errors import DaCSegError, UserError, print_error
from my_dataset_chromosome import ChromosomeDataset, load_label_json
from train_utils import stain
from train_utils.cli import check_model_name, parse_validation_args
from train_utils.engine.checkpoint import (
    checkpoint_label_map,
    config_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from train_utils.data.loaders import evaluation_loader
from train_utils.engine.loop import resolve_amp
from train_utils.evaluation.coco_eval import evaluate_results
from train_utils.evaluation.score import evaluate
from train_utils.inference.tta import FlipTTA
from train_utils.outputs.files import check_output_dir
from train_utils.outputs.predictions import IMAGES_JSON
from train_utils.outputs.record import format_summary, write_record



def check_class_flags(args: argparse.Namespace, dataset: ChromosomeDataset, model_classes: int | None = None) -> None:
    """``--num-classes`` and ``--label-json-path`` must agree with the data (and the checkpoint); UserError if not."""
    where = f"split {args.split!r} of {args.data_path}"
    if model_classes is not None and model_classes != dataset.num_classes:
        raise UserError(f"{args.weights_path} was trained for {model_classes} class(es) but {where} has "
                        f"{dataset.num_classes}: {', '.join(dataset.label_names.values())}")
    if args.num_classes is not None and args.num_classes != dataset.num_classes:
        raise UserError(f"--num-classes {args.num_classes} does not match {where}, which has {dataset.num_classes} "
                        f"class(es): {', '.join(dataset.label_names.values())}")
    if args.label_json_path is not None:
        names = load_label_json(args.label_json_path)
        if names != dataset.label_names:
            raise UserError(f"{args.label_json_path} names {names} but {where} has categories {dataset.label_names}")


def _predict_image_ids(results_path: Path, dataset: ChromosomeDataset) -> tuple[dict[int, int], int] | None:
    """predict.py's ids -> the split's ids, by image file, from ``images.json`` next to the results; None if absent.

    Also returns how many predicted images were not in the split.
    """
    index_path = results_path.parent / IMAGES_JSON
    try:
        index = json.loads(index_path.read_text())
        entries = [(int(e["id"]), str(e["file_name"])) for e in index["images"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    by_path, by_name = {}, {}
    for image_id in dataset.ids:
        file_name = dataset.coco.imgs[image_id]["file_name"]
        by_path[os.path.realpath(dataset.images_dir / file_name)] = image_id
        by_name.setdefault(Path(file_name).name, []).append(image_id)
    mapping: dict[int, int] = {}
    outside = 0
    for predicted_id, file_name in entries:
        split_id = by_path.get(os.path.realpath(file_name))
        if split_id is None and len(by_name.get(Path(file_name).name, [])) == 1:
            split_id = by_name[Path(file_name).name][0]
        if split_id is None:
            outside += 1
        else:
            mapping[predicted_id] = split_id
    return mapping, outside


def load_results(path: str | os.PathLike, dataset: ChromosomeDataset) -> tuple[list[dict[str, Any]], list[int] | None]:
    """The detections of a results file and the image ids to score (None: the whole split).

    A ``predictions.json`` with predict.py's ``images.json`` beside it is matched to the split by image file:
    detections on images outside the split are dropped, and only the split's images that were predicted are scored.
    """
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"results file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read results file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"malformed JSON in {path}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(results, list):
        raise UserError(f"{path} is not a COCO results file: expected a JSON list of detections, got a "
                        f"{type(results).__name__}")
    found = _predict_image_ids(path, dataset)
    if found is None:
        return results, None
    mapping, outside = found
    if not mapping:
        raise UserError(f"none of the images listed in {path.parent / IMAGES_JSON} belong to split "
                        f"{dataset.split!r} of {dataset.root}")
    kept = []
    for k, r in enumerate(results):
        if not isinstance(r, Mapping) or "image_id" not in r:
            raise UserError(f"{path}: result {k} is not a detection with an image_id")
        if r["image_id"] in mapping:
            kept.append({**r, "image_id": mapping[r["image_id"]]})
    if outside:
        print(f"note: {outside} image(s) in {path.parent / IMAGES_JSON} are not in split {dataset.split!r}; "
              f"their detections are left out", file=sys.stderr)
    return kept, sorted(set(mapping.values()))


def _checkpoint_record(args: argparse.Namespace) -> dict[str, Any]:
    """Run the checkpoint's model over the split and evaluate it, through ``train_utils.evaluation.score`` as
    training does."""
    # everything that can be wrong is checked before the model is built
    dataset = ChromosomeDataset(args.data_path, args.split)
    checkpoint = load_checkpoint(args.weights_path)
    config = config_from_checkpoint(checkpoint, args.weights_path)
    check_model_name(args.model, config, args.weights_path)
    check_class_flags(args, dataset, config.num_classes)
    label_to_cat_id = checkpoint_label_map(checkpoint, dataset, args.weights_path)
    model, config = model_from_checkpoint(checkpoint, args.weights_path, args.device)
    polarity = stain.checkpoint_polarity(checkpoint, args.weights_path, args.stain)
    stain.match_dataset(dataset, polarity, args.stain)
    if args.tta:
        model = FlipTTA(model, score_thresh=float(model.roi_heads.score_thresh), mask_thresh=args.mask_thresh)
    device = torch.device(args.device)
    record = evaluate(model, evaluation_loader(dataset, args.workers, device, args.batch_size), device, dataset.coco,
                      label_to_cat_id, args.score_thresh, label_names=dataset.label_names,
                      amp_dtype=resolve_amp(args.amp, args.amp_dtype, device), mask_threshold=args.mask_thresh,
                      min_overlap_area=config.min_overlap_area, show_progress=True)
    record.update(weights_path=str(args.weights_path), epoch=checkpoint.get("epoch"), model=config.name,
                  stain={"mode": args.stain, "model_polarity": polarity, "inverted": len(dataset.invert_ids)},
                  tta=bool(args.tta))
    return record


def _results_record(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the detections of ``--results-json``."""
    dataset = ChromosomeDataset(args.data_path, args.split)
    check_class_flags(args, dataset)
    results, image_ids = load_results(args.results_json, dataset)
    try:
        record = evaluate_results(dataset.coco, results, args.score_thresh, image_ids=image_ids)
    except ValueError as exc:
        raise UserError(f"{args.results_json} does not fit split {args.split!r} of {args.data_path}: {exc}") from None
    record.update(results_json=str(args.results_json))
    return record


def run_validation(args: argparse.Namespace) -> tuple[dict[str, Any], Path, Path]:
    """Evaluate as the flags say and write the record; returns ``(record, txt_path, json_path)``.

    Raises UserError, DatasetError or CheckpointError (one line each) for what a user can fix; an ``--output-dir``
    that cannot be written is refused before the scoring.
    """
    try:
        check_output_dir(args.output_dir)
    except OSError as exc:
        raise UserError(str(exc)) from None
    record = _checkpoint_record(args) if args.weights_path else _results_record(args)
    record.update(data_path=str(args.data_path), split=args.split)
    try:
        txt_path, json_path = write_record(record, args.output_dir)
    except OSError as exc:
        raise UserError(f"cannot write the record into {args.output_dir}: {exc.strerror or exc}") from None
    return record, txt_path, json_path


def main(argv: Sequence[str] | None = None) -> int:
    """``validation.py``'s entry point: exit 0, or 2 with one ``error: ...`` line for a user error."""
    args = parse_validation_args(argv)
    try:
        record, txt_path, json_path = run_validation(args)
    except DaCSegError as exc:
        print_error(exc)
        return 2
    print(format_summary(record))
    print(f"{record['num_images']} image(s), {record['num_gt']} instance(s), "
          f"{record['num_detections_at_thresh']} detection(s) scoring >= {record['score_thresh']:g}; "
          f"record in {txt_path} and {json_path}")
    return 0
