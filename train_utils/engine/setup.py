"""What a training run is made of: ``resolve_run`` turns the command line, the ``--resume`` checkpoint and the data
into the frozen ``RunConfig`` (``train_utils.engine.run_config``), in one place, refusing every contradiction before
the first step; the builders (model, optimizer, training loader) take its pieces. ``train_utils.engine.trainer`` runs
it; ``bench/`` reuses the builders.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from errors import UserError
from my_dataset_chromosome import ChromosomeDataset
from network_files import ModelConfig, build_model, load_detector_weights, resolve_config
from overlaps import MIN_OVERLAP_AREA
from train_utils import distributed, stain
from train_utils.data import loaders
from train_utils.data.samplers import train_batch_sampler
from train_utils.distributed import DistInfo
from train_utils.engine import loop, schedule
from train_utils.engine.checkpoint import (
    checkpoint_label_map,
    config_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from train_utils.engine.run_config import (
    DataSettings,
    Labels,
    OptimizerSettings,
    OutputSettings,
    RunConfig,
    ScheduleSettings,
    StainSettings,
    model_config_from_args,
)
from train_utils.engine.pretrained import (
    PretrainedRecord,
    check_pretrained,
    pretrained_polarity_note,
    read_pretrained_record,
)
from train_utils.outputs.files import check_output_dir
from train_utils.outputs.tensorboard import TENSORBOARD_DIR, check_log_dir
from transforms import get_transform

Log = Callable[[str], None]


@dataclass
class RunInputs:
    """What resolving a run read: the ``--resume`` checkpoint, the datasets (images checked, the images ``--stain``
    inverts marked) and the lines that say how the automatic settings were decided, for the run to print."""

    checkpoint: dict[str, Any] | None
    train_ds: ChromosomeDataset | None  # None with --test-only
    val_ds: ChromosomeDataset
    notes: list[str] = field(default_factory=list)
    pretrained_lines: list[str] = field(default_factory=list)  # what a --pretrained checkpoint of ours is


def resolve_run(args: argparse.Namespace, info: DistInfo, device: torch.device,
                log: Log) -> tuple[RunConfig, RunInputs]:
    """The one place a run's settings are decided: the flags' automatic values (``--model``, ``--loss-weights`` and
    ``--min-overlap-area`` from the checkpoint on a resume, ``--seed``, ``--amp``, ``--accumulate-steps``, ``--lr``,
    ``--warmup-iters``), the labels and the stain polarity. Everything that can be wrong is refused here, before the
    first step; ``args`` is only read."""
    output = output_settings(args)
    if info.is_main:
        check_outputs(output)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    start_epoch = int(checkpoint["epoch"]) + 1 if checkpoint is not None else 0
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    pending_eval = checkpoint is not None and checkpoint.get("pending_eval") is not None
    if not args.test_only and start_epoch >= args.epochs and not pending_eval:
        raise UserError(f"--epochs {args.epochs}: nothing left to train from epoch {start_epoch}; ask for more epochs")
    saved = config_from_checkpoint(checkpoint, args.resume) if checkpoint is not None else None
    if saved is not None:
        check_model_flags(args, saved)
    min_overlap_area = saved.min_overlap_area if saved is not None else (
        MIN_OVERLAP_AREA if args.min_overlap_area is None else args.min_overlap_area)
    seed = resolve_seed(args.seed, checkpoint)
    train_ds, val_ds = load_datasets(args, min_overlap_area, log)
    for dataset in (train_ds, val_ds):  # a broken val image is found now, not after a whole training epoch
        if dataset is not None:
            dataset.check_images(show_progress=info.is_main)
    if checkpoint is not None:
        checkpoint_label_map(checkpoint, val_ds, args.resume)
    model = saved if saved is not None else fresh_model_config(args, val_ds.num_classes)
    if saved is not None and saved.num_classes != val_ds.num_classes:
        raise UserError(f"{args.resume} has {saved.num_classes} classes but the data has {val_ds.num_classes}")
    if args.sync_bn and info.distributed and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs (torch synchronises batch norm on CUDA devices only)")
    pretrained = read_pretrained_record(args.pretrained) if checkpoint is None and args.pretrained else None
    # another backbone is refused here; the lines are printed as the weights load
    pretrained_lines = check_pretrained(pretrained, model) if pretrained is not None else []
    stain_settings, notes = match_stain(args.stain, checkpoint, args.resume, train_ds, val_ds, info, pretrained)
    optimizer = lr_schedule = None
    if not args.test_only:
        optimizer, lr_schedule, optimization_notes = resolve_optimization(args, checkpoint, len(train_ds),
                                                                          info.world_size)
        notes += optimization_notes
    amp_on = loop.resolve_amp(args.amp, args.amp_dtype, device) is not None  # default: on for CUDA, off on the CPU
    data = DataSettings(root=Path(args.data_path), train_split=args.train_split, val_split=args.val_split,
                        augmentation=args.data_augmentation, invert_prob=args.invert_prob,
                        group_factor=args.aspect_ratio_group_factor, batch_size=args.batch_size, workers=args.workers,
                        labels=Labels.of(val_ds), stain=stain_settings)
    config = RunConfig(model=model, data=data, optimizer=optimizer, schedule=lr_schedule, output=output, seed=seed,
                       amp_dtype=args.amp_dtype if amp_on else None, start_epoch=start_epoch,
                       world_size=info.world_size, resume=args.resume, pretrained=args.pretrained,
                       pretrained_backbone=args.pretrained_backbone, test_only=args.test_only, sync_bn=args.sync_bn,
                       score_thresh=args.score_thresh, mask_thresh=args.mask_thresh,
                       flags=MappingProxyType(copy.deepcopy(vars(args))))
    return config, RunInputs(checkpoint, train_ds, val_ds, notes, pretrained_lines)


def output_settings(args: argparse.Namespace) -> OutputSettings:
    """Where process 0 writes (``--tensorboard-dir``, else ``OUTPUT_DIR/tensorboard``, with ``--tensorboard``)."""
    tensorboard_dir, flag = None, "--tensorboard"
    if args.tensorboard and not args.test_only:
        if args.tensorboard_dir is not None:
            tensorboard_dir, flag = Path(args.tensorboard_dir), "--tensorboard-dir"
        else:
            tensorboard_dir = Path(args.output_dir) / TENSORBOARD_DIR
    return OutputSettings(output_dir=Path(args.output_dir), tensorboard_dir=tensorboard_dir, tensorboard_flag=flag,
                          save_every=args.save_every, keep_last=args.keep_last, print_freq=args.print_freq,
                          eval_interval=args.eval_interval)


def check_outputs(output: OutputSettings) -> None:
    """Refuse, before anything is read or created, an ``--output-dir`` or TensorBoard folder that cannot be
    written (a file in the way, no permission) and ``--tensorboard`` without its package: a run refused for its
    flags leaves nothing on disk."""
    try:
        check_output_dir(output.output_dir)
    except OSError as exc:
        raise UserError(str(exc)) from None
    if output.tensorboard_dir is not None:
        check_log_dir(output.tensorboard_dir, output.tensorboard_flag)


def check_model_flags(args: argparse.Namespace, saved: ModelConfig) -> None:
    """A resume continues the checkpoint's model: ``--model``, ``--loss-weights`` and ``--min-overlap-area`` that
    contradict it are a ``UserError``."""
    if args.model is not None and args.model != saved.name:
        raise UserError(f"--model {args.model} but {args.resume} holds a {saved.name} model; a resume "
                        "continues the checkpoint's model (drop --model, or train a new one without --resume)")
    if args.loss_weights and args.loss_weights != saved.loss_weights:
        raise UserError(f"--loss-weights {args.loss_weights} but {args.resume} was trained with "
                        f"{saved.loss_weights or 'all weights 1'}; a resume keeps the checkpoint's")
    if args.min_overlap_area is not None and args.min_overlap_area != saved.min_overlap_area:
        raise UserError(f"--min-overlap-area {args.min_overlap_area:g} but {args.resume} was trained with "
                        f"{saved.min_overlap_area:g}; a resume keeps the checkpoint's")


def fresh_model_config(args: argparse.Namespace, num_classes: int) -> ModelConfig:
    """The model config of a new run: the flags' with the data's classes, automatic fields resolved."""
    if args.num_classes is not None and args.num_classes != num_classes:
        raise UserError(f"--num-classes {args.num_classes} but the data has {num_classes} categories")
    pretrained = bool(args.pretrained or args.pretrained_backbone)
    return resolve_config(model_config_from_args(args, num_classes), pretrained=pretrained)


def resolve_seed(seed: int | None, checkpoint: dict[str, Any] | None) -> int:
    """``--seed``, else the checkpoint's, else a fresh one shared by all processes (kept across resumes)."""
    if seed is not None:
        return seed
    saved = (checkpoint or {}).get("args", {}).get("seed")
    return saved if saved is not None else distributed.broadcast_object(int.from_bytes(os.urandom(4), "little"))


def resolve_optimization(args: argparse.Namespace, checkpoint: dict[str, Any] | None, train_images: int,
                         world_size: int) -> tuple[OptimizerSettings, ScheduleSettings, list[str]]:
    """The optimizer and schedule settings that run: ``--accumulate-steps`` clamped to the batches an epoch has,
    the lr scaled to the total batch unless ``--lr`` gives it, the warmup of the steps the run has; and the lines
    that say so. A resume must keep the checkpoint's ``--opt`` and per-step schedule."""
    if checkpoint is not None:
        saved_opt = (checkpoint.get("args") or {}).get("opt")
        if saved_opt is not None and saved_opt != args.opt:
            raise UserError(f"--opt {args.opt} but {args.resume} was trained with --opt {saved_opt}, whose state "
                            f"cannot drive {args.opt}; resume with --opt {saved_opt} (or start a new run)")
        schedule.check_resumable(checkpoint, args.resume)
    batches = len(train_batch_sampler(train_images, None, args.batch_size, -1, world_size))  # each process's
    accumulate_steps = schedule.fit_accumulation(args.accumulate_steps, batches)
    total_batch = world_size * args.batch_size * accumulate_steps
    lr = schedule.scaled_lr(total_batch) if args.lr is None else args.lr
    steps_per_epoch = math.ceil(batches / accumulate_steps)
    warmup = (schedule.default_warmup_iters(args.epochs * steps_per_epoch) if args.warmup_iters is None
              else args.warmup_iters)
    optimizer = OptimizerSettings(name=args.opt, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                  clip_grad_norm=args.clip_grad_norm, accumulate_steps=accumulate_steps)
    settings = ScheduleSettings(epochs=args.epochs, steps_per_epoch=steps_per_epoch, warmup_iters=warmup,
                                scheduler=args.lr_scheduler, lr_steps=tuple(args.lr_steps), gamma=args.lr_gamma,
                                warmup_factor=args.warmup_factor)
    note = schedule.accumulation_note(args.accumulate_steps, accumulate_steps, batches)
    line = (f"{schedule.lr_line(lr, args.lr is not None, world_size, args.batch_size, accumulate_steps)}; "
            f"{schedule.schedule_line(settings, args.clip_grad_norm)}")
    return optimizer, settings, ([note] if note else []) + [line]


def make_optimizer(model: torch.nn.Module, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters, at the base lr (the schedule sets each step's)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.name == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def seed_everything(seed: int, stream: int, rank: int) -> None:
    """Seed Python, NumPy and torch (all devices) from ``(seed, stream, rank)``; stream 0 is the model's
    initialisation, stream ``epoch + 1`` an epoch."""
    state = int(np.random.SeedSequence([seed, stream, rank]).generate_state(1)[0])
    random.seed(state)
    np.random.seed(state)
    torch.manual_seed(state)


def load_datasets(args: argparse.Namespace, min_overlap_area: float,
                  log: Log = print) -> tuple[ChromosomeDataset | None, ChromosomeDataset]:
    """The training (None with ``--test-only``) and validation datasets; their categories must agree."""
    root = Path(args.data_path)
    if not root.is_dir():
        raise UserError(f"--data-path {root}: no such directory")
    val_ds = ChromosomeDataset(root, split=args.val_split, transforms=get_transform("none", train=False),
                               min_overlap_area=min_overlap_area)
    if args.test_only:
        return None, val_ds
    train_ds = ChromosomeDataset(
        root, split=args.train_split,
        transforms=get_transform(args.data_augmentation, train=True, invert_prob=args.invert_prob),
        min_overlap_area=min_overlap_area,
    )
    if train_ds.label_names != val_ds.label_names or train_ds.label_to_cat_id != val_ds.label_to_cat_id:
        raise UserError(f"categories differ between {train_ds.ann_file} and {val_ds.ann_file}")
    if len(train_ds) == 0:
        raise UserError(f"{train_ds.ann_file} has no images to train on")
    if train_ds.num_instances == 0:
        raise UserError(f"{train_ds.ann_file} has no annotated instances to train on (its \"annotations\" list is "
                        "empty or missing)")
    if val_ds.num_instances == 0:
        log(f"warning: {val_ds.ann_file} has no annotated instances; its AP will read -1")
    return train_ds, val_ds


def match_stain(mode: str, checkpoint: dict[str, Any] | None, resume: str | None, train_ds: ChromosomeDataset | None,
                val_ds: ChromosomeDataset, info: DistInfo,
                pretrained: PretrainedRecord | None = None) -> tuple[StainSettings, list[str]]:
    """Decide the model's stain polarity (the checkpoint's, else under ``--stain auto`` the ``--pretrained``
    checkpoint's, else the training images' majority) and mark the images that ``--stain`` inverts as they load;
    returns the settings and, when training, the lines that say so."""
    saved = (checkpoint or {}).get("stain") or {}
    target = stain.checkpoint_polarity(checkpoint or {}, resume, mode, announce=False)
    counts = saved.get("train_counts")
    lines = []
    if target is None and pretrained is not None and mode == "auto" and pretrained.polarity is not None:
        target = pretrained.polarity
        lines.append(f"stain: the model keeps the polarity of --pretrained {pretrained.source} ({target})")

    def polarities(dataset: ChromosomeDataset) -> dict[int, str]:
        found = stain.dataset_polarities(dataset, show_progress=info.is_main) if info.is_main else None
        return distributed.broadcast_object(found)

    if train_ds is not None:
        train_polarity = polarities(train_ds)
        majority, counts = stain.majority(train_polarity.values())
        if target is None:
            target = majority if mode != "invert" else stain.POLARITIES[1 - stain.POLARITIES.index(majority)]
        train_ds.invert_ids = stain.images_to_invert(train_polarity, target, mode)
        note = pretrained_polarity_note(pretrained, target, mode) if pretrained is not None else None
        lines += [note] if note else []
        lines.append(f"stain: {counts[stain.BRIGHT_ON_DARK]} bright-on-dark and {counts[stain.DARK_ON_BRIGHT]} "
                     f"dark-on-bright training image(s); the model learns {target} (--stain {mode}: "
                     f"{len(train_ds.invert_ids)} inverted as they load)")
    elif info.is_main:
        stain.checkpoint_polarity(checkpoint or {}, resume, mode)  # the note for an older checkpoint
    stain.match_dataset(val_ds, target, mode, find=polarities)
    return StainSettings(mode=mode, polarity=target, train_counts=counts), lines


def build_run_model(config: RunConfig, checkpoint: dict[str, Any] | None, log: Log,
                    pretrained_lines: Sequence[str] = ()) -> torch.nn.Module:
    """The model (on the CPU): the checkpoint's weights, or ``--pretrained`` / ``--pretrained-backbone``, or
    initialised from the seed's stream 0 (seed it first); ``pretrained_lines`` (what a ``--pretrained`` checkpoint of
    ours is, from ``resolve_run``) are printed before its weights load."""
    if checkpoint is not None:
        return model_from_checkpoint(checkpoint, config.resume)[0]
    model = build_model(config.model, pretrained_backbone=config.pretrained_backbone)
    for line in pretrained_lines:
        log(line)
    if config.pretrained:
        log(str(load_detector_weights(model, config.pretrained)))
    return model


def training_loader(dataset: ChromosomeDataset, data: DataSettings, seed: int, device: torch.device,
                    info: DistInfo = DistInfo()) -> DataLoader:
    """This process's batches of the training set: aspect-ratio groups of ``-b`` images, reshuffled per epoch from
    the seed (``set_epoch``)."""
    return loaders.training_loader(dataset, dataset.aspect_ratios(), batch_size=data.batch_size,
                                   group_factor=data.group_factor, workers=data.workers, seed=seed, device=device,
                                   world_size=info.world_size, rank=info.rank)
