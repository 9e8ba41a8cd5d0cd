"""Every script's command line: the parsers of ``train.py`` / ``train_multi_GPU.py``, ``validation.py`` and
``predict.py``, and the pieces the tools build theirs from (``ArgumentParser``, ``number_arg``, ``expand_inputs``,
``--min-overlap-area``). Errors are one line and exit status 2; every number is range-checked.

Training defaults are the reference recipe (stock torchvision Mask R-CNN on BioImLab): SGD, lr 0.02 for a total batch
of 4 (scaled linearly to the total batch), momentum 0.9, weight decay 1e-4, a linear warmup over the first 300
optimizer steps from 0.001x, cosine decay over 121 epochs, gradient norms clipped at 10, horizontal + vertical flips,
and a model trained from scratch unless ``--pretrained`` / ``--pretrained-backbone`` give weights.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
from pathlib import Path
from typing import Any, NoReturn, Sequence

import torch

from errors import UserError, one_line
from network_files.config import (BACKBONE_NAMES, FUSIONS, LOSS_NAMES, MODEL_NAMES, NORM_LAYERS, OVERLAP_CLS_HEADS,
                                   ModelConfig)
from overlaps import MIN_OVERLAP_AREA
from train_utils.engine.run_config import OptimizerSettings
from train_utils.outputs.crops import CROP_BACKGROUNDS
from train_utils.outputs.exports import EXPORT_FORMATS
from train_utils.outputs.summary import DEFAULT_EXPECTED_COUNT
from train_utils.outputs.visualize import OVERLAY_LABELS
from train_utils.stain import STAIN_MODES
from transforms import PRESETS

_MODEL_DEFAULTS = ModelConfig()
_OPTIMIZER_DEFAULTS = OptimizerSettings()  # the reference recipe's


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line, ``<prog>: error: <message>``, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_workers() -> int:
    """Data-loading processes: up to 8 (a GPU step at the reference's ~34 images/s needs several), at most the cores."""
    return min(8, os.cpu_count() or 1)


def device_arg(text: str) -> str:
    """``--device`` value: a torch device string that this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return text


def number_arg(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse ``type`` converting to ``kind`` and checking ``low <= value <= high`` (``low < value`` if open)."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def loss_weight_arg(text: str) -> tuple[str, float]:
    """``--loss-weights`` item: ``name=value`` with a known loss name and a finite weight >= 0."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not name=value (e.g. loss_mask=2)")
    if name not in LOSS_NAMES:
        raise argparse.ArgumentTypeError(f"unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}")
    weight = number_arg(float, low=0.0)(value)
    return name, weight


class LossWeightsAction(argparse.Action):
    """Collects ``name=value`` pairs into a dict (later ones win)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        weights = dict(getattr(namespace, self.dest) or {})
        weights.update(dict(values))
        setattr(namespace, self.dest, weights)


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``cuda`` when available, else ``cpu``)."""
    parser.add_argument("--device", type=device_arg, default=default_device(),
                        help="device to run on: cpu, cuda or cuda:<index> (default: %(default)s)")


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--data-path`` (the COCO-layout root) and ``-j/--workers``."""
    parser.add_argument("--data-path", required=required, metavar="DIR",
                        help="dataset root holding images/ and annotations/instances_<split>.json")
    parser.add_argument("-j", "--workers", type=number_arg(int, low=0), default=default_workers(), metavar="N",
                        help="data-loading worker processes (default: %(default)s; 0 loads in the main process)")


def add_stain_arg(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """``--stain auto|as-is|invert`` (see ``train_utils.stain``)."""
    auto = ("invert the training and validation images whose polarity differs from the training images' majority"
            if training else "bring each image to the polarity the checkpoint was trained on")
    parser.add_argument("--stain", choices=STAIN_MODES, default="auto",
                        help=f"stain polarity (bright chromosomes on dark, as Q-band, or dark on light, as G-band): "
                             f"auto: {auto}; as-is: use images as they are; invert: invert every image "
                             f"(default: %(default)s)")


def add_min_overlap_area_arg(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """``--min-overlap-area`` (training and the converters): one default (``overlaps.MIN_OVERLAP_AREA``), one range
    check. Training's default is None: the ``--resume`` checkpoint's value, else the rule's default."""
    default = f"the --resume checkpoint's, else {MIN_OVERLAP_AREA:g}" if training else "%(default)s"
    parser.add_argument("--min-overlap-area", type=number_arg(float, low=0.0),
                        default=None if training else MIN_OVERLAP_AREA, metavar="PX2",
                        help=f"smallest shared area (px^2, original image scale) that counts as a crossing rather "
                             f"than a touch (default: {default})")


def add_threshold_args(parser: argparse.ArgumentParser) -> None:
    """``--score-thresh`` (detections counted by precision/recall/F1, count error, pictures) and ``--mask-thresh``."""
    parser.add_argument("--score-thresh", type=number_arg(float, 0.0, 1.0), default=0.5, metavar="S",
                        help="keep detections scoring at least S for precision/recall/F1, counts and pictures "
                             "(default: %(default)s)")
    parser.add_argument("--mask-thresh", type=number_arg(float, 0.0, 1.0), default=0.5, metavar="T",
                        help="mask probability above which a pixel belongs to the instance (default: %(default)s)")


def add_model_check_arg(parser: argparse.ArgumentParser) -> None:
    """``--model`` for scripts that rebuild the model from a checkpoint: an optional check, never a second source."""
    parser.add_argument("--model", choices=MODEL_NAMES, default=None,
                        help="check that the checkpoint holds this model (the model is rebuilt from the checkpoint "
                             "either way)")


def check_model_name(expected: str | None, config: ModelConfig, checkpoint_path: object) -> None:
    """Raise ``UserError`` when ``--model`` names another model than the checkpoint holds."""
    if expected is not None and expected != config.name:
        raise UserError(f"--model {expected} but {checkpoint_path} holds a {config.name} model")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags that become the ``ModelConfig`` (stored in every checkpoint) and the initial weights."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=MODEL_NAMES, default=None,
                       help="plain Mask R-CNN or DaCSeg's overlap-aware heads (default: maskrcnn; with --resume the "
                            "checkpoint's, and a different one is an error)")
    group.add_argument("--num-classes", type=number_arg(int, low=1), default=None, metavar="K",
                       help="object classes without background (default: the categories of the training data, "
                            "1 for a chromosome set); must match the data")
    group.add_argument("--backbone", choices=BACKBONE_NAMES, default=_MODEL_DEFAULTS.backbone,
                       help="ResNet of the ResNet-FPN backbone (default: %(default)s)")
    group.add_argument("--trainable-backbone-layers", type=number_arg(int, 0, 5), default=None, metavar="N",
                       help="ResNet stages to train, 0-5 (default: 3 with pretrained weights, 5 from scratch)")
    group.add_argument("--norm-layer", choices=NORM_LAYERS, default=None,
                       help="backbone normalisation (default: frozen_bn with pretrained weights, bn from scratch; "
                            "prefer frozen_bn below a batch of 4)")
    group.add_argument("--min-size", type=number_arg(int, low=32), default=_MODEL_DEFAULTS.min_size, metavar="PX",
                       help="shorter image side after the model's resize (default: %(default)s)")
    group.add_argument("--max-size", type=number_arg(int, low=32), default=_MODEL_DEFAULTS.max_size, metavar="PX",
                       help="longer image side limit after the model's resize (default: %(default)s)")
    group.add_argument("--anchor-sizes", type=number_arg(int, low=1), nargs=5, metavar="PX",
                       default=list(_MODEL_DEFAULTS.anchor_sizes),
                       help="anchor size of each of the 5 FPN levels (default: %(default)s)")
    group.add_argument("--box-score-thresh", type=number_arg(float, 0.0, 1.0), default=_MODEL_DEFAULTS.box_score_thresh,
                       metavar="S", help="lowest score the model outputs; COCO AP wants it low (default: %(default)s)")
    group.add_argument("--box-nms-thresh", type=number_arg(float, 0.0, 1.0), default=_MODEL_DEFAULTS.box_nms_thresh,
                       metavar="IOU", help="IoU of the per-class NMS on the final boxes (default: %(default)s)")
    group.add_argument("--detections-per-img", type=number_arg(int, low=1),
                       default=_MODEL_DEFAULTS.box_detections_per_img, metavar="N",
                       help="most detections per image (default: %(default)s)")
    group.add_argument("--rois-per-image", type=number_arg(int, low=1), default=_MODEL_DEFAULTS.rois_per_image,
                       metavar="N", help="RoIs sampled per training image for the box and mask losses; fewer train "
                                         "faster on a CPU (default: %(default)s)")
    group.add_argument("--overlap-cls-head", choices=OVERLAP_CLS_HEADS, default=_MODEL_DEFAULTS.overlap_cls_head,
                       help="DaCSeg overlap classifier: fc as published (~52 M parameters) or a small conv head "
                            "(default: %(default)s)")
    group.add_argument("--fusion", choices=FUSIONS, default=_MODEL_DEFAULTS.fusion,
                       help="what DaCSeg's final mask head reads besides the RoI features: stage2 (F + X2, as "
                            "published), stage1 (F + X1), gated (F + p * X2, p the overlap classifier's probability) "
                            "or none (default: %(default)s)")
    group.add_argument("--crossing-mask-weight", type=number_arg(float, low=0.0),
                       default=_MODEL_DEFAULTS.crossing_mask_weight, metavar="W",
                       help="DaCSeg: weight of the final mask loss on the pixels where a crossing chromosome meets "
                            "another (default: %(default)s, the plain mask loss)")
    group.add_argument("--neighbour-mask-weight", type=number_arg(float, low=0.0),
                       default=_MODEL_DEFAULTS.neighbour_mask_weight, metavar="W",
                       help="DaCSeg: weight of the final mask loss on the pixels of the other chromosomes inside a "
                            "RoI, where a mask spills into the arm it crosses (default: %(default)s, the plain loss)")
    group.add_argument("--shape-prior", default=None, metavar="CODEBOOK",
                       help="DaCSeg: refine each mask with the nearest shapes of a codebook written by "
                            "tools/build_shape_codebook.py; it is stored in the checkpoint (default: off)")
    group.add_argument("--shape-prior-nearest", type=number_arg(int, low=1),
                       default=_MODEL_DEFAULTS.shape_prior_nearest, metavar="K",
                       help="codebook shapes given to each RoI with --shape-prior (default: %(default)s)")
    add_min_overlap_area_arg(group, training=True)
    group.add_argument("--loss-weights", type=loss_weight_arg, nargs="+", action=LossWeightsAction, default={},
                       metavar="NAME=W", help="weights of loss terms, e.g. loss_mask=2 loss_overlap=0.5 (default: 1 "
                                              "each)")
    group.add_argument("--pretrained", default=None, metavar="WEIGHTS",
                       help="start from a (COCO) Mask R-CNN: a local state-dict file such as "
                            "maskrcnn_resnet50_fpn_coco.pth or a torchvision weights name (default: none)")
    group.add_argument("--pretrained-backbone", default=None, metavar="WEIGHTS",
                       help="start the ResNet from ImageNet weights: a local file such as resnet50.pth or a "
                            "torchvision weights name (default: none, from scratch)")


def add_amp_args(parser: argparse.ArgumentParser) -> None:
    """``--amp/--no-amp`` and ``--amp-dtype``: training and scoring share the default (on for CUDA, off on the CPU),
    so a checkpoint scores the same through ``train.py --test-only`` and ``validation.py``."""
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (autocast; a gradient scaler with float16) (default: on for CUDA, "
                             "off on the CPU)")
    parser.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="float16",
                        help="autocast dtype with --amp (default: %(default)s)")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Data, optimisation and schedule of ``train.py``."""
    group = parser.add_argument_group("training data")
    group.add_argument("--train-split", default="train", metavar="NAME",
                       help="split trained on: annotations/instances_NAME.json (default: %(default)s)")
    group.add_argument("--val-split", default="val", metavar="NAME",
                       help="split evaluated after each epoch (default: %(default)s)")
    group.add_argument("--data-augmentation", choices=PRESETS, default="flip",
                       help="training augmentation preset; flip = horizontal + vertical flips (default: %(default)s)")
    add_stain_arg(group, training=True)
    group.add_argument("--invert-prob", type=number_arg(float, 0.0, 1.0), default=0.0, metavar="P",
                       help="invert grey levels of a training image with probability P (Q-band <-> G-band look) "
                            "(default: %(default)s)")
    group.add_argument("--aspect-ratio-group-factor", type=number_arg(int, low=-1), default=3, metavar="K",
                       help="batch images of similar aspect ratio, 2K+1 ratio bins; -1 turns grouping off "
                            "(default: %(default)s)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=number_arg(int, low=1), default=121, metavar="N",
                       help="total epochs to train; the reference recipe's length on 109 images, use fewer on "
                            "large sets (default: %(default)s)")
    group.add_argument("-b", "--batch-size", type=number_arg(int, low=1), default=4, metavar="N",
                       help="images per step and per process (default: %(default)s)")
    group.add_argument("--opt", choices=("sgd", "adamw"), default=_OPTIMIZER_DEFAULTS.name,
                       help="optimizer (default: %(default)s)")
    group.add_argument("--lr", type=number_arg(float, 0.0, low_open=True), default=None,
                       help="learning rate for the total batch (default: 0.02 per 4 images, scaled linearly to "
                            "processes x -b x --accumulate-steps)")
    group.add_argument("--momentum", type=number_arg(float, 0.0, 1.0), default=_OPTIMIZER_DEFAULTS.momentum,
                       metavar="M", help="SGD momentum (default: %(default)s)")
    group.add_argument("--wd", "--weight-decay", dest="weight_decay", type=number_arg(float, low=0.0),
                       default=_OPTIMIZER_DEFAULTS.weight_decay, metavar="WD",
                       help="weight decay (default: %(default)s)")
    group.add_argument("--clip-grad-norm", type=number_arg(float, low=0.0),
                       default=_OPTIMIZER_DEFAULTS.clip_grad_norm, metavar="NORM",
                       help="clip the total gradient norm to NORM before each optimizer step; 0 turns clipping off "
                            "(default: %(default)s)")
    group.add_argument("--accumulate-steps", type=number_arg(int, low=1),
                       default=_OPTIMIZER_DEFAULTS.accumulate_steps, metavar="N",
                       help="sum the gradients of N batches per optimizer step (N x -b images per step; batch norm "
                            "still sees -b images per forward, see --norm-layer frozen_bn or --sync-bn) "
                            "(default: %(default)s)")
    add_amp_args(group)
    group = parser.add_argument_group("learning-rate schedule")
    group.add_argument("--lr-scheduler", choices=("cosine", "multistep"), default="cosine",
                       help="learning-rate decay after the warmup, per optimizer step (default: %(default)s)")
    group.add_argument("--lr-steps", type=number_arg(int, low=1), nargs="+", default=[16, 22], metavar="EPOCH",
                       help="epochs at which multistep multiplies the lr by --lr-gamma (default: %(default)s)")
    group.add_argument("--lr-gamma", type=number_arg(float, 0.0, 1.0), default=0.1, metavar="G",
                       help="multistep lr factor (default: %(default)s)")
    group.add_argument("--warmup-iters", type=number_arg(int, low=0), default=None, metavar="N",
                       help="linear lr warmup over the first N optimizer steps of the run, across epochs; 0 turns "
                            "it off (default: 300, at most half the run)")
    group.add_argument("--warmup-factor", type=number_arg(float, 0.0, 1.0, low_open=True), default=1e-3, metavar="F",
                       help="lr factor at the first warmup iteration (default: %(default)s)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Seed, progress, evaluation, outputs, checkpoints, resuming and distributed options of ``train.py``."""
    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=number_arg(int, low=0), default=None,
                       help="random seed (default: a fresh one, saved in args.json and the checkpoints)")
    group.add_argument("--print-freq", type=number_arg(int, low=1), default=10, metavar="N",
                       help="iterations between progress updates (default: %(default)s)")
    group.add_argument("--eval-interval", type=number_arg(int, low=1), default=1, metavar="N",
                       help="evaluate every N epochs and after the last (default: %(default)s)")
    group.add_argument("--output-dir", default="./save_weights", metavar="DIR",
                       help="where checkpoints, result files and plots go (default: %(default)s)")
    group.add_argument("--tensorboard", action="store_true",
                       help="also log the loss terms, lr and validation record for TensorBoard (needs the "
                            "tensorboard package)")
    group.add_argument("--tensorboard-dir", default=None, metavar="DIR",
                       help="where --tensorboard writes (default: OUTPUT_DIR/tensorboard)")
    group.add_argument("--save-every", type=number_arg(int, low=1), default=1, metavar="N",
                       help="write model_<epoch>.pth every N epochs and after the last one; a resume goes back to "
                            "the newest (default: %(default)s)")
    group.add_argument("--keep-last", type=number_arg(int, low=0), default=3, metavar="N",
                       help="keep the newest N model_<epoch>.pth (best.pth always kept; 0 keeps all) "
                            "(default: %(default)s)")
    group.add_argument("--resume", default=None, metavar="CKPT",
                       help="continue training from a checkpoint (model_<epoch>.pth); its model config is used")
    group.add_argument("--start-epoch", type=number_arg(int, low=0), default=None, metavar="N",
                       help="epoch to start from (default: 0, or the epoch after the --resume checkpoint)")
    group.add_argument("--test-only", action="store_true",
                       help="only evaluate the --resume checkpoint (or the --pretrained weights) on --val-split and "
                            "write record_mAP.txt/.json")
    group.add_argument("--sync-bn", action="store_true",
                       help="synchronise batch-norm statistics across processes (with --norm-layer bn)")
    group.add_argument("--dist-timeout", type=number_arg(int, low=1), default=1800, metavar="S",
                       help="seconds a process waits for the others before the job fails (default: %(default)s)")


def get_args_parser(prog: str | None = None, description: str | None = None) -> ArgumentParser:
    """The parser of ``train.py`` and ``train_multi_GPU.py``."""
    parser = ArgumentParser(prog=prog, description=description or "Train Mask R-CNN or DaCSeg on chromosomes.")
    add_data_args(parser)
    add_device_args(parser)
    add_threshold_args(parser)
    add_model_args(parser)
    add_training_args(parser)
    add_run_args(parser)
    return parser


def parse_args(
    argv: Sequence[str] | None = None, prog: str | None = None, description: str | None = None
) -> argparse.Namespace:
    """Parse and cross-check training flags (errors exit 2 with one line)."""
    parser = get_args_parser(prog=prog, description=description)
    args = parser.parse_args(argv)
    if args.max_size < args.min_size:
        parser.error(f"--max-size {args.max_size} is smaller than --min-size {args.min_size}")
    if args.test_only and not (args.resume or args.pretrained):
        parser.error("--test-only needs weights: give --resume CKPT or --pretrained WEIGHTS")
    if args.lr_scheduler == "multistep" and sorted(args.lr_steps) != list(args.lr_steps):
        parser.error(f"--lr-steps must increase, got {' '.join(map(str, args.lr_steps))}")
    if args.tensorboard_dir is not None and not args.tensorboard:
        parser.error("argument --tensorboard-dir: goes with --tensorboard (add it to log for TensorBoard)")
    return args


def get_validation_parser() -> ArgumentParser:
    """The parser of ``validation.py``."""
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
    add_amp_args(parser)
    parser.add_argument("--tta", action="store_true",
                        help="test-time flips: score the merge of each image and its three flips "
                             "(train_utils/inference/tta.py)")
    parser.add_argument("-b", "--batch-size", type=number_arg(int, low=1), default=1, metavar="N",
                        help="images per inference batch (default: %(default)s)")
    parser.add_argument("--num-classes", type=number_arg(int, low=1), default=None, metavar="K",
                        help="classes without background; only checked against the checkpoint and the data")
    parser.add_argument("--label-json-path", default=None, metavar="JSON",
                        help='class names {"1": "chromosome", ...}; checked against the data\'s categories')
    return parser


def parse_validation_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check ``validation.py``'s flags (errors exit 2 with one line)."""
    parser = get_validation_parser()
    args = parser.parse_args(argv)
    for flag, used in (("--model", args.model is not None), ("--tta", args.tta), ("--amp", args.amp is not None)):
        if used and args.results_json is not None:
            parser.error(f"argument {flag}: goes with --weights-path; a --results-json file is scored as it is")
    return args


def get_predict_parser() -> ArgumentParser:
    """The parser of ``predict.py``."""
    parser = ArgumentParser(prog="predict.py", description="Predict chromosome instances on images with a trained "
                            "checkpoint (Mask R-CNN or DaCSeg).")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders of images, or quoted globs (e.g. 'data/**/*.tif')")
    parser.add_argument("--weights-path", required=True, metavar="CKPT",
                        help="checkpoint written by train.py (model_<epoch>.pth or best.pth), or a model.onnx "
                             "(run with onnxruntime) or model.xml (OpenVINO) written by tools/export.py, on the CPU")
    parser.add_argument("--output-dir", default="predictions", metavar="DIR",
                        help="where the pictures and JSON files go (default: %(default)s)")
    parser.add_argument("--label-json-path", default=None, metavar="JSON",
                        help='class names {"1": "chromosome", ...} (default: the names stored in the checkpoint)')
    parser.add_argument("--overlap-thresh", type=number_arg(float, 0.0, 1.0), default=0.5, metavar="P",
                        help="DaCSeg: outline detections whose overlap score is at least P (default: %(default)s)")
    parser.add_argument("--overlay-labels", choices=OVERLAY_LABELS, default="full",
                        help="what the overlay PNG writes over the masks: full (boxes and 'number: score' captions), "
                             "numbers (the numbers alone, as the crops are numbered, no boxes) or none (default: "
                             "%(default)s)")
    parser.add_argument("--save-overlap-maps", action="store_true",
                        help="DaCSeg: also write each image's four overlap probability maps as grey PNGs")
    parser.add_argument("--tta", action="store_true",
                        help="test-time flips: predict the image and its three flips and merge them by mask matching "
                             "(about 4x the time)")
    parser.add_argument("--bf16", action="store_true",
                        help="run the backbone in bfloat16: about 2.5x faster on CPUs with AMX or AVX-512 BF16, but "
                             "the detections differ a little from float32's (see README: Speed)")
    parser.add_argument("--no-upscale", action="store_true",
                        help="run images that already fit --min-size..--max-size at their own size instead of "
                             "enlarging them to the checkpoint's min-size (about 2x faster for 768x576 images at "
                             "min-size 800; the masks then come from another scale)")
    parser.add_argument("--openvino", action="store_true",
                        help="CPU: run the backbone, RPN head and RoI convolutions with OpenVINO in exact float32 (pip "
                             "install openvino; converting costs seconds once per run, see README: Speed)")
    parser.add_argument("--threads", type=number_arg(int, low=1), default=None, metavar="N",
                        help="CPU threads for inference (default: the library's, one per core)")
    add_crop_args(parser)
    add_export_args(parser)
    add_device_args(parser)
    add_threshold_args(parser)
    add_model_check_arg(parser)
    add_stain_arg(parser)
    return parser


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """``predict.py --export`` (outlines to correct in an annotation tool, ``train_utils.outputs.exports``) and
    what ``summary.csv`` flags."""
    group = parser.add_argument_group("editable exports and summary.csv")
    group.add_argument("--export", nargs="+", action="extend", choices=EXPORT_FORMATS, default=[], metavar="FORMAT",
                       help=f"also write each detection as an editable outline, overlaps kept; FORMAT is any of "
                            f"{', '.join(EXPORT_FORMATS)} (labelme/<name>.json, <name>_rois.zip for ImageJ/Fiji, "
                            f"<name>.geojson for QuPath, annotations/instances_predicted.json for CVAT and train.py)")
    group.add_argument("--review-below", type=number_arg(float, 0.0, 1.0), default=0.7, metavar="S",
                       help="flag detections scoring below S for review in the exports, and count them in "
                            "summary.csv (default: %(default)s)")
    group.add_argument("--expected-count", type=number_arg(int, low=0), default=DEFAULT_EXPECTED_COUNT, metavar="N",
                       help="summary.csv's count_flag marks images whose detection count differs from N; 0 turns "
                            "the check off (default: %(default)s)")


def add_crop_args(parser: argparse.ArgumentParser) -> None:
    """``predict.py --crops`` and how the karyotype crops look (``train_utils.outputs.crops``)."""
    crops = parser.add_argument_group("karyotype crops")
    crops.add_argument("--crops", default=None, metavar="DIR",
                       help="also write each detected chromosome upright on a clean background, a contact sheet per "
                            "image and crops.json into DIR")
    crops.add_argument("--crop-background", choices=CROP_BACKGROUNDS, default="auto",
                       help="colour around each crop; auto: white for dark-on-bright (G-band) images, black for "
                            "bright-on-dark (Q-band) ones (default: %(default)s)")
    crops.add_argument("--crop-margin", type=number_arg(int, low=0), default=8, metavar="PX",
                       help="background pixels around each chromosome (default: %(default)s)")
    crops.add_argument("--crop-height", type=number_arg(int, low=1), default=None, metavar="PX",
                       help="scale every crop to this height (default: keep the image's pixel scale)")


def parse_predict_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check ``predict.py``'s flags (errors exit 2 with one line)."""
    parser = get_predict_parser()
    args = parser.parse_args(argv)
    if args.save_overlap_maps and args.tta:
        parser.error("argument --tta: not with --save-overlap-maps (the maps are not merged over flips)")
    args.export = list(dict.fromkeys(args.export))  # each format once, in the order given
    return args


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def expand_inputs(patterns: Sequence[str | os.PathLike], suffixes: Sequence[str] = IMAGE_SUFFIXES,
                  what: str = "images") -> list[Path]:
    """Files from INPUT arguments: files as named (whatever their suffix), the ``suffixes`` files of folders (not
    recursive, hidden files skipped) and of quoted globs, in order and without repeats. ``UserError`` names an input
    that gives nothing."""
    found: list[Path] = []
    listed = " ".join(suffixes)
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            files = _folder_files(path, suffixes)
            if not files:
                raise UserError(f"folder {path} holds no {what} ({listed})")
            found.extend(files)
        else:
            hits = [Path(hit) for hit in sorted(glob.glob(str(pattern), recursive=True))]
            if not hits:
                raise UserError(f"input {str(pattern)!r} matches no file or folder")
            files = [f for hit in hits for f in (_folder_files(hit, suffixes) if hit.is_dir() else [hit])
                     if f.suffix.lower() in suffixes and not f.name.startswith(".")]
            if not files:
                raise UserError(f"input {str(pattern)!r} matches {len(hits)} path(s) but no {what} ({listed})")
            found.extend(files)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _folder_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))
