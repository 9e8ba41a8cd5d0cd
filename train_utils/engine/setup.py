"""What a training run is made of, from its flags: the datasets, the model, the seed, the optimizer and lr schedule,
the training loader and the stain polarity. ``train_utils.engine.trainer`` runs it; ``bench/`` reuses the pieces.

The automatic values are resolved into ``args`` (``resolve_run_flags``, ``fit_accumulation``, ``resolve_lr``,
``match_stain``), so ``args.json`` and the checkpoints record what ran.
"""
from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from errors import UserError
from my_dataset_chromosome import ChromosomeDataset
from network_files import ModelConfig, build_model, load_detector_weights, resolve_config
from overlaps import MIN_OVERLAP_AREA
from train_utils import stain
from train_utils.cli import model_config_from_args
from train_utils.engine import distributed, loop, schedule
from train_utils.engine.checkpoint import (
    checkpoint_label_map,
    config_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from train_utils.engine.distributed import DistInfo
from train_utils.engine.pretrained import (
    PretrainedRecord,
    check_pretrained,
    pretrained_polarity_note,
    read_pretrained_record,
)
from train_utils.engine.samplers import train_batch_sampler
from transforms import get_transform


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)


def total_batch(args: argparse.Namespace, world_size: int) -> int:
    """Images per optimizer step over all processes: processes x ``-b`` x ``--accumulate-steps``."""
    return world_size * args.batch_size * args.accumulate_steps


def fit_accumulation(args: argparse.Namespace, batches_per_epoch: int) -> str | None:
    """Clamp ``--accumulate-steps`` to the batches an epoch has, so that the lr is scaled to the batch an optimizer
    step really sums (a group never spans two epochs: 50 asked of a 2-batch epoch would sum 2 at the lr of 50).
    Returns the line that says so, or None when the value fits."""
    if args.accumulate_steps <= batches_per_epoch:
        return None
    asked, args.accumulate_steps = args.accumulate_steps, max(batches_per_epoch, 1)
    return (f"note: --accumulate-steps {asked} is more than the {batches_per_epoch} batch(es) an epoch has; each "
            f"optimizer step sums the whole epoch, --accumulate-steps {args.accumulate_steps}, and the lr is scaled "
            "to that batch")


def resolve_lr(args: argparse.Namespace, world_size: int) -> tuple[float, str]:
    """The base lr and a line saying where it came from (``--lr``, or 0.02 per 4 images scaled to the total batch)."""
    batch = total_batch(args, world_size)
    if args.lr is not None:
        return args.lr, f"lr {args.lr:g} (--lr) for a total batch of {batch}"
    lr = schedule.scaled_lr(batch)
    return lr, (f"lr {lr:g}: {schedule.REFERENCE_LR:g} per {schedule.REFERENCE_BATCH} images scaled to a total "
                f"batch of {batch} ({world_size} process(es) x -b {args.batch_size} x --accumulate-steps "
                f"{args.accumulate_steps}); --lr sets it")


def make_schedule(optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int,
                  start_epoch: int = 0):
    """The run's per-step lr schedule (``train_utils.engine.schedule``), placed at ``start_epoch``, and its warmup length in
    optimizer steps."""
    total_steps = args.epochs * steps_per_epoch
    warmup = schedule.default_warmup_iters(total_steps) if args.warmup_iters is None else args.warmup_iters
    lr_scheduler = schedule.make_lr_scheduler(
        optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, warmup_iters=warmup,
        warmup_factor=args.warmup_factor, scheduler=args.lr_scheduler, lr_steps=args.lr_steps, gamma=args.lr_gamma,
        start_step=start_epoch * steps_per_epoch)
    return lr_scheduler, warmup


def seed_everything(seed: int, stream: int, rank: int) -> None:
    """Seed Python, NumPy and torch (all devices) from ``(seed, stream, rank)``; stream 0 is the model's
    initialisation, stream ``epoch + 1`` an epoch."""
    state = int(np.random.SeedSequence([seed, stream, rank]).generate_state(1)[0])
    random.seed(state)
    np.random.seed(state)
    torch.manual_seed(state)


def _check_data_path(args: argparse.Namespace) -> Path:
    root = Path(args.data_path)
    if not root.is_dir():
        raise UserError(f"--data-path {root}: no such directory")
    return root


def load_datasets(args: argparse.Namespace) -> tuple[ChromosomeDataset | None, ChromosomeDataset]:
    """The training (None with ``--test-only``) and validation datasets; their categories must agree."""
    root = _check_data_path(args)
    val_ds = ChromosomeDataset(root, split=args.val_split, transforms=get_transform("none", train=False),
                               min_overlap_area=args.min_overlap_area)
    if args.test_only:
        return None, val_ds
    train_ds = ChromosomeDataset(
        root, split=args.train_split,
        transforms=get_transform(args.data_augmentation, train=True, invert_prob=args.invert_prob),
        min_overlap_area=args.min_overlap_area,
    )
    if train_ds.label_names != val_ds.label_names or train_ds.label_to_cat_id != val_ds.label_to_cat_id:
        raise UserError(f"categories differ between {train_ds.ann_file} and {val_ds.ann_file}")
    if len(train_ds) == 0:
        raise UserError(f"{train_ds.ann_file} has no images to train on")
    if train_ds.num_instances == 0:
        raise UserError(f"{train_ds.ann_file} has no annotated instances to train on (its \"annotations\" list is "
                        "empty or missing)")
    if val_ds.num_instances == 0:
        print(f"warning: {val_ds.ann_file} has no annotated instances; its AP will read -1", flush=True)
    return train_ds, val_ds


def build_run_model(args: argparse.Namespace, num_classes: int, checkpoint: dict[str, Any] | None,
                    log, pretrained_record: PretrainedRecord | None = None) -> tuple[torch.nn.Module, ModelConfig]:
    """The model (weights from the checkpoint, or ``--pretrained`` / ``--pretrained-backbone``) and its config;
    ``pretrained_record`` is the record of a DaCSeg checkpoint given to ``--pretrained``, checked against the model."""
    if checkpoint is not None:
        config = config_from_checkpoint(checkpoint, args.resume)
        if config.num_classes != num_classes:
            raise UserError(f"{args.resume} has {config.num_classes} classes but the data has {num_classes}")
        return model_from_checkpoint(checkpoint, args.resume)
    if args.num_classes is not None and args.num_classes != num_classes:
        raise UserError(f"--num-classes {args.num_classes} but the data has {num_classes} categories")
    pretrained = bool(args.pretrained or args.pretrained_backbone)
    config = resolve_config(model_config_from_args(args, num_classes), pretrained=pretrained)
    model = build_model(config, pretrained_backbone=args.pretrained_backbone)
    if args.pretrained:
        for line in check_pretrained(pretrained_record, config) if pretrained_record is not None else ():
            log(line)
        log(str(load_detector_weights(model, args.pretrained)))
    return model, config


def resolve_run_flags(args: argparse.Namespace, checkpoint: dict[str, Any] | None, device: torch.device) -> None:
    """Fill the flags left automatic: ``--model``, ``--loss-weights`` and ``--min-overlap-area`` (the checkpoint's
    on a resume, where a contradicting flag is a ``UserError``), ``--seed`` (the checkpoint's, else a fresh one
    shared by all processes) and ``--amp`` (on for CUDA). ``args`` then holds what runs (``args.json`` records it)."""
    config = config_from_checkpoint(checkpoint, args.resume) if checkpoint is not None else None
    if config is None:
        args.model = args.model or ModelConfig.name
        args.min_overlap_area = MIN_OVERLAP_AREA if args.min_overlap_area is None else args.min_overlap_area
    else:
        if args.model is not None and args.model != config.name:
            raise UserError(f"--model {args.model} but {args.resume} holds a {config.name} model; a resume "
                            "continues the checkpoint's model (drop --model, or train a new one without --resume)")
        if args.loss_weights and args.loss_weights != config.loss_weights:
            raise UserError(f"--loss-weights {args.loss_weights} but {args.resume} was trained with "
                            f"{config.loss_weights or 'all weights 1'}; a resume keeps the checkpoint's")
        if args.min_overlap_area is not None and args.min_overlap_area != config.min_overlap_area:
            raise UserError(f"--min-overlap-area {args.min_overlap_area:g} but {args.resume} was trained with "
                            f"{config.min_overlap_area:g}; a resume keeps the checkpoint's")
        args.model, args.loss_weights = config.name, dict(config.loss_weights)
        args.min_overlap_area = config.min_overlap_area
    if args.seed is None:  # one seed for all processes, kept across resumes
        saved = (checkpoint or {}).get("args", {}).get("seed")
        args.seed = saved if saved is not None else distributed.broadcast_object(
            int.from_bytes(os.urandom(4), "little"))
    args.amp = loop.resolve_amp(args.amp, args.amp_dtype, device) is not None


def training_loader(dataset: ChromosomeDataset, args: argparse.Namespace, device: torch.device, world_size: int = 1,
                    rank: int = 0) -> DataLoader:
    """This process's batches of the training set: aspect-ratio groups of ``-b`` images, reshuffled per epoch from
    the seed (``set_epoch``)."""
    sampler = train_batch_sampler(len(dataset), dataset.aspect_ratios(), args.batch_size,
                                  args.aspect_ratio_group_factor, world_size, rank, args.seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, collate_fn=loop.collate_fn,
                      pin_memory=device.type == "cuda")


def prepare(args: argparse.Namespace, info: DistInfo, device: torch.device, log):
    """Checkpoint, start epoch, datasets (images checked), resolved flags, seed, model (on no device yet) and stain:
    everything that can be wrong is found before the first step."""
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    start_epoch = int(checkpoint["epoch"]) + 1 if checkpoint is not None else 0
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    pending_eval = checkpoint is not None and checkpoint.get("pending_eval") is not None
    if not args.test_only and start_epoch >= args.epochs and not pending_eval:
        raise UserError(f"--epochs {args.epochs}: nothing left to train from epoch {start_epoch}; ask for more epochs")
    resolve_run_flags(args, checkpoint, device)
    train_ds, val_ds = load_datasets(args)
    for dataset in (train_ds, val_ds):  # a broken val image is found now, not after a whole training epoch
        if dataset is not None:
            dataset.check_images(show_progress=info.is_main)
    if checkpoint is not None:
        checkpoint_label_map(checkpoint, val_ds, args.resume)
    pretrained = read_pretrained_record(args.pretrained) if checkpoint is None and args.pretrained else None
    seed_everything(args.seed, 0, info.rank)
    model, config = build_run_model(args, val_ds.num_classes, checkpoint, log, pretrained)
    match_stain(args, info, checkpoint, train_ds, val_ds, log, pretrained)
    return checkpoint, start_epoch, train_ds, val_ds, model, config


def match_stain(args: argparse.Namespace, info: DistInfo, checkpoint: dict[str, Any] | None,
                train_ds: ChromosomeDataset | None, val_ds: ChromosomeDataset, log,
                pretrained: PretrainedRecord | None = None) -> None:
    """Decide the model's stain polarity (the checkpoint's, else under ``--stain auto`` the ``--pretrained``
    checkpoint's, else the training images' majority) and mark the images that ``--stain`` inverts as they load; the
    polarity and the split go into ``args`` (``args.json``, checkpoints)."""
    saved = (checkpoint or {}).get("stain") or {}
    target = stain.checkpoint_polarity(checkpoint or {}, args.resume, args.stain, announce=False)
    if target is None and pretrained is not None and args.stain == "auto" and pretrained.polarity is not None:
        target = pretrained.polarity
        log(f"stain: the model keeps the polarity of --pretrained {pretrained.source} ({target})")
    counts = saved.get("train_counts")

    def polarities(dataset: ChromosomeDataset) -> dict[int, str]:
        found = stain.dataset_polarities(dataset, show_progress=info.is_main) if info.is_main else None
        return distributed.broadcast_object(found)

    if train_ds is not None:
        train_polarity = polarities(train_ds)
        majority, counts = stain.majority(train_polarity.values())
        if target is None:
            target = majority if args.stain != "invert" else stain.POLARITIES[1 - stain.POLARITIES.index(majority)]
        train_ds.invert_ids = stain.images_to_invert(train_polarity, target, args.stain)
        note = pretrained_polarity_note(pretrained, target, args.stain) if pretrained is not None else None
        if note:
            log(note)
        log(f"stain: {counts[stain.BRIGHT_ON_DARK]} bright-on-dark and {counts[stain.DARK_ON_BRIGHT]} dark-on-bright "
            f"training image(s); the model learns {target} (--stain {args.stain}: {len(train_ds.invert_ids)} "
            f"inverted as they load)")
    elif info.is_main:
        stain.checkpoint_polarity(checkpoint or {}, args.resume, args.stain)  # the note for an older checkpoint
    stain.match_dataset(val_ds, target, args.stain, find=polarities)
    args.stain_polarity, args.stain_counts = target, counts
