"""A training run's settings, decided once. ``train_utils.engine.setup.resolve_run`` makes the ``RunConfig`` from
the command line, the ``--resume`` checkpoint and the data; nothing changes it afterwards (it is frozen, and
``tests/test_run_config.py`` checks that no code assigns to it). ``args.json`` and the checkpoints' ``args`` are its
``record()``; the builders take the piece they need.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from errors import UserError
from network_files.config import ModelConfig
from overlaps import MIN_OVERLAP_AREA
from train_utils.engine.schedule import REFERENCE_LR


@dataclass(frozen=True)
class Labels:
    """The model's labels 1..K: their names and COCO category ids (``labels.json`` and the checkpoints)."""

    names: Mapping[int, str]
    to_cat_id: Mapping[int, int]

    @classmethod
    def of(cls, dataset: Any) -> "Labels":
        """A dataset's labels (``my_dataset_chromosome.ChromosomeDataset``)."""
        return cls(dict(dataset.label_names), dict(dataset.label_to_cat_id))


@dataclass(frozen=True)
class StainSettings:
    """``--stain`` and what it decided: the look the model learns (``train_utils.stain``) and, when training, how many
    training images had each look."""

    mode: str = "auto"
    polarity: str | None = None
    train_counts: Mapping[str, int] | None = None


@dataclass(frozen=True)
class DataSettings:
    """Where the images come from and how they are loaded."""

    root: Path
    train_split: str
    val_split: str
    augmentation: str
    invert_prob: float
    group_factor: int  # --aspect-ratio-group-factor
    batch_size: int  # images per step and process (-b)
    workers: int
    labels: Labels
    stain: StainSettings


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer and what acts on each of its steps; the defaults are the reference recipe."""

    name: str = "sgd"  # --opt: sgd or adamw
    lr: float = REFERENCE_LR  # the base lr for the total batch (the default is for REFERENCE_BATCH images)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad_norm: float = 10.0  # 0: off
    accumulate_steps: int = 1  # batches summed per optimizer step


@dataclass(frozen=True)
class ScheduleSettings:
    """The per-optimizer-step lr schedule (``train_utils.engine.schedule``)."""

    epochs: int
    steps_per_epoch: int  # optimizer steps
    warmup_iters: int
    scheduler: str = "cosine"  # or multistep
    lr_steps: tuple[int, ...] = (16, 22)  # multistep's epochs
    gamma: float = 0.1
    warmup_factor: float = 1e-3

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass(frozen=True)
class OutputSettings:
    """What process 0 writes, where and how often."""

    output_dir: Path
    tensorboard_dir: Path | None  # None: no TensorBoard log
    tensorboard_flag: str  # the flag that chose tensorboard_dir, for messages
    save_every: int
    keep_last: int
    print_freq: int
    eval_interval: int


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run (or ``--test-only`` evaluation) runs with, resolved."""

    model: ModelConfig  # the --resume checkpoint's, else the flags' with the data's classes
    data: DataSettings
    optimizer: OptimizerSettings | None  # None with --test-only
    schedule: ScheduleSettings | None  # None with --test-only
    output: OutputSettings
    seed: int
    amp_dtype: str | None  # autocast dtype name; None: full precision
    start_epoch: int
    world_size: int
    resume: str | None
    pretrained: str | None
    pretrained_backbone: str | None
    test_only: bool
    sync_bn: bool
    score_thresh: float
    mask_thresh: float
    flags: Mapping[str, Any]  # the command line as parsed (read only); only record() reads it

    def record(self) -> dict[str, Any]:
        """The command line with the values that ran in place of the automatic ones, then the stain polarity and
        training counts: the ``args`` of every checkpoint (``args.json`` adds the world size)."""
        ran: dict[str, Any] = {"model": self.model.name, "min_overlap_area": self.model.min_overlap_area,
                               "loss_weights": dict(self.model.loss_weights), "seed": self.seed,
                               "amp": self.amp_dtype is not None}
        if self.optimizer is not None:
            ran.update(accumulate_steps=self.optimizer.accumulate_steps, lr=self.optimizer.lr)
        if self.schedule is not None:
            ran.update(warmup_iters=self.schedule.warmup_iters)
        counts = self.data.stain.train_counts
        return {**self.flags, **ran, "stain_polarity": self.data.stain.polarity,
                "stain_counts": dict(counts) if counts is not None else None}


def model_config_from_args(args: argparse.Namespace, num_classes: int | None = None) -> ModelConfig:
    """The (unresolved) ``ModelConfig`` the flags describe; ``num_classes`` overrides ``args.num_classes``.

    ``network_files.resolve_config`` fills the automatic fields. Raises ``UserError`` for an impossible combination.
    """
    try:
        return ModelConfig(
            name=args.model or "maskrcnn",
            num_classes=num_classes if num_classes is not None else (args.num_classes or 1),
            backbone=args.backbone,
            trainable_layers=args.trainable_backbone_layers,
            norm_layer=args.norm_layer,
            min_size=args.min_size,
            max_size=args.max_size,
            anchor_sizes=tuple(args.anchor_sizes),
            box_score_thresh=args.box_score_thresh,
            box_nms_thresh=args.box_nms_thresh,
            box_detections_per_img=args.detections_per_img,
            rois_per_image=args.rois_per_image,
            overlap_cls_head=args.overlap_cls_head,
            fusion=args.fusion,
            crossing_mask_weight=args.crossing_mask_weight,
            neighbour_mask_weight=args.neighbour_mask_weight,
            shape_prior=args.shape_prior,
            shape_prior_nearest=args.shape_prior_nearest,
            min_overlap_area=MIN_OVERLAP_AREA if args.min_overlap_area is None else args.min_overlap_area,
            loss_weights=dict(args.loss_weights or {}),
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None

