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
from torch.utils.data import DataLoader

from my_dataset_chromosome import ChromosomeDataset, DatasetError, load_label_json
from train_utils import stain
from train_utils.cli import (
    ArgumentParser,
    UserError,
    add_data_args,
    add_device_args,
    add_model_check_arg,
    add_stain_arg,
    add_threshold_args,
    check_model_name,
    print_error,
)
from train_utils.engine.checkpoint import (
    CheckpointError,
    config_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from train_utils.engine.loop import collate_fn, predict_results
from train_utils.evaluation.coco_eval import evaluate_results
from train_utils.inference.tta import FlipTTA
from train_utils.outputs.record import format_summary, write_record

# written next to predictions.json by predict.py: maps its image ids (input order) to image files
PREDICT_IMAGES_JSON = "images.json"


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="validation.py", description="Score a checkpoint, or an existing COCO results file, "
                            "on a dataset split; writes record_mAP.txt and record_mAP.json.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights-path", metavar="CKPT",
                        help="checkpoint written by train.py (model_<epoch>.pth or best.pth); the model is rebuilt "
                             "from it alone")
    source.add_argument("--results-json", metavar="JSON",
                        help="score this COCO results file (a list of detections with image_id, category_id, score "
                             "and bbox and/or segmentation) instead of running a model")
    add_data_args(parser)
    parser.add_argument("--split", default="val", metavar="NAME",
                        help="split to score: annotations/instances_NAME.json (default: %(default)s)")
    parser.add_argument("--output-dir", default=".", metavar="DIR",
                        help="where record_mAP.txt and record_mAP.json go (default: the current folder)")
    add_device_args(parser)
    add_threshold_args(parser)
    add_model_check_arg(parser)
    add_stain_arg(parser)
    parser.add_argument("--tta", action="store_true",
                        help="test-time flips: score the merge of each image and its three flips (train_utils.inference.tta)")
    parser.add_argument("-b", "--batch-size", type=int, default=1, metavar="N",
                        help="images per inference batch (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=None, metavar="K",
                        help="classes without background; only checked against the checkpoint and the data")
    parser.add_argument("--label-json-path", default=None, metavar="JSON",
                        help='class names {"1": "chromosome", ...}; checked against the data\'s categories')
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags (errors exit 2 with one line)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"argument -b/--batch-size: {args.batch_size} must be >= 1")
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(f"argument --num-classes: {args.num_classes} must be >= 1 (background not counted)")
    if args.model is not None and args.results_json is not None:
        parser.error("argument --model: checks a --weights-path checkpoint; a --results-json file has no model")
    if args.tta and args.results_json is not None:
        parser.error("argument --tta: runs a --weights-path model; a --results-json file is scored as it is")
    return args


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
    index_path = results_path.parent / PREDICT_IMAGES_JSON
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
        raise UserError(f"none of the images listed in {path.parent / PREDICT_IMAGES_JSON} belong to split "
                        f"{dataset.split!r} of {dataset.root}")
    kept = []
    for k, r in enumerate(results):
        if not isinstance(r, Mapping) or "image_id" not in r:
            raise UserError(f"{path}: result {k} is not a detection with an image_id")
        if r["image_id"] in mapping:
            kept.append({**r, "image_id": mapping[r["image_id"]]})
    if outside:
        print(f"note: {outside} image(s) in {path.parent / PREDICT_IMAGES_JSON} are not in split {dataset.split!r}; "
              f"their detections are left out", file=sys.stderr)
    return kept, sorted(set(mapping.values()))


def _checkpoint_record(args: argparse.Namespace) -> dict[str, Any]:
    """Run the checkpoint's model over the split and evaluate its detections."""
    # everything that can be wrong is checked before the model is built
    dataset = ChromosomeDataset(args.data_path, args.split)
    checkpoint = load_checkpoint(args.weights_path)
    config = config_from_checkpoint(checkpoint, args.weights_path)
    check_model_name(args.model, config, args.weights_path)
    check_class_flags(args, dataset, config.num_classes)
    label_to_cat_id = {int(k): int(v) for k, v in (checkpoint.get("label_to_cat_id") or dataset.label_to_cat_id).items()}
    if label_to_cat_id != dataset.label_to_cat_id:
        raise UserError(f"{args.weights_path} maps its labels to category ids {label_to_cat_id} but split "
                        f"{args.split!r} of {args.data_path} has {dataset.label_to_cat_id}")
    model, config = model_from_checkpoint(checkpoint, args.weights_path, args.device)
    polarity = stain.checkpoint_polarity(checkpoint, args.weights_path, args.stain)
    stain.match_dataset(dataset, polarity, args.stain)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=collate_fn)
    if args.tta:
        model = FlipTTA(model, score_thresh=float(model.roi_heads.score_thresh), mask_thresh=args.mask_thresh)
    results, image_ids = predict_results(model, loader, torch.device(args.device), label_to_cat_id,
                                         mask_threshold=args.mask_thresh, show_progress=True)
    record = evaluate_results(dataset.coco, results, args.score_thresh, image_ids=image_ids,
                              min_overlap_area=config.min_overlap_area)
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

    Raises UserError, DatasetError or CheckpointError (one line each) for what a user can fix.
    """
    record = _checkpoint_record(args) if args.weights_path else _results_record(args)
    record.update(data_path=str(args.data_path), split=args.split)
    try:
        txt_path, json_path = write_record(record, args.output_dir)
    except OSError as exc:
        raise UserError(f"cannot write the record into {args.output_dir}: {exc.strerror or exc}") from None
    return record, txt_path, json_path


def main(argv: Sequence[str] | None = None) -> int:
    """``validation.py``'s entry point: exit 0, or 2 with one ``error: ...`` line for a user error."""
    args = parse_args(argv)
    try:
        record, txt_path, json_path = run_validation(args)
    except (UserError, DatasetError, CheckpointError) as exc:
        print_error(exc)
        return 2
    print(format_summary(record))
    print(f"{record['num_images']} image(s), {record['num_gt']} instance(s), "
          f"{record['num_detections_at_thresh']} detection(s) scoring >= {record['score_thresh']:g}; "
          f"record in {txt_path} and {json_path}")
    return 0
