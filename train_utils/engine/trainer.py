"""The training job behind ``train.py`` and ``train_multi_GPU.py``: one code path for one process or a torchrun job.

Writes into ``--output-dir`` (process 0 only): ``args.json``, ``labels.json``, per epoch ``model_<epoch>.pth`` (the
last ``--keep-last``), ``best.pth`` (best segm AP), a line in ``det_results.txt`` / ``seg_results.txt`` (see
``train_utils.outputs.results``), a record in ``metrics.jsonl``, and the plots ``loss_and_lr.png`` / ``mAP.png``.
``--test-only`` writes ``record_mAP.txt`` / ``record_mAP.json`` instead.

An epoch that is evaluated is checkpointed before its evaluation (marked ``pending_eval``, with the epoch's training
stats) and again after it; a run resumed from a checkpoint still marked evaluates that epoch first, so a failure or
kill during evaluation loses neither the training nor the epoch's result lines.

Randomness is reseeded at the start of every epoch from ``(seed, epoch, rank)``, and the training order from
``(seed, epoch)``: a run resumed from ``model_<e>.pth`` repeats the uninterrupted run's epochs ``e + 1 ...``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from backbone import WeightsError
from my_dataset_chromosome import ChromosomeDataset, DatasetError, save_label_json
from network_files import ModelConfig, build_model, load_detector_weights, resolve_config
from overlaps import MIN_OVERLAP_AREA
from train_utils import stain
from train_utils.cli import UserError, model_config_from_args, one_line, print_error
from train_utils.engine import distributed, loop, schedule
from train_utils.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    config_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from train_utils.engine.distributed import DistInfo
from train_utils.engine.samplers import ShardSampler, train_batch_sampler
from train_utils.outputs import plots, results
from train_utils.outputs.record import format_summary, write_record
from train_utils.outputs.results import prepare_output_dir
from train_utils.outputs.tensorboard import TENSORBOARD_DIR, TensorBoardLog
from transforms import get_transform

USER_ERRORS = (UserError, DatasetError, CheckpointError, WeightsError)
ARGS_JSON = "args.json"
LABELS_JSON = "labels.json"
BEST_CHECKPOINT = "best.pth"
LR_SCHEDULE_PER_STEP = "per_step"  # checkpoints' lr_scheduler counts optimizer steps (older ones counted epochs)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)


def total_batch(args: argparse.Namespace, world_size: int) -> int:
    """Images per optimizer step over all processes: processes x ``-b`` x ``--accumulate-steps``."""
    return world_size * args.batch_size * args.accumulate_steps


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


def _label_maps(dataset: ChromosomeDataset, checkpoint: dict[str, Any] | None, where: str) -> None:
    """A checkpoint's classes must be the dataset's."""
    if checkpoint is None or "label_to_cat_id" not in checkpoint:
        return
    ckpt_labels = {int(k): int(v) for k, v in checkpoint["label_to_cat_id"].items()}
    if ckpt_labels != dataset.label_to_cat_id:
        raise UserError(f"{where} was trained on categories {ckpt_labels} (label: COCO id) but {dataset.ann_file} "
                        f"has {dataset.label_to_cat_id}")


def build(args: argparse.Namespace, num_classes: int, checkpoint: dict[str, Any] | None, log) -> tuple[Any, Any]:
    """The model (weights from the checkpoint, or ``--pretrained`` / ``--pretrained-backbone``) and its config."""
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
        log(str(load_detector_weights(model, args.pretrained)))
    return model, config


def resolve_resumed_flags(args: argparse.Namespace, checkpoint: dict[str, Any] | None) -> None:
    """A resume continues the checkpoint's model: ``--model``, ``--loss-weights`` and ``--min-overlap-area`` that
    contradict it are a ``UserError``; ``args`` then holds what runs (``args.json`` records it)."""
    if checkpoint is None:
        args.model = args.model or ModelConfig.name
        args.min_overlap_area = MIN_OVERLAP_AREA if args.min_overlap_area is None else args.min_overlap_area
        return
    config = config_from_checkpoint(checkpoint, args.resume)
    if args.model is not None and args.model != config.name:
        raise UserError(f"--model {args.model} but {args.resume} holds a {config.name} model; a resume continues "
                        "the checkpoint's model (drop --model, or train a new one without --resume)")
    if args.loss_weights and args.loss_weights != config.loss_weights:
        raise UserError(f"--loss-weights {args.loss_weights} but {args.resume} was trained with "
                        f"{config.loss_weights or 'all weights 1'}; a resume keeps the checkpoint's")
    if args.min_overlap_area is not None and args.min_overlap_area != config.min_overlap_area:
        raise UserError(f"--min-overlap-area {args.min_overlap_area:g} but {args.resume} was trained with "
                        f"{config.min_overlap_area:g}; a resume keeps the checkpoint's")
    args.model, args.loss_weights = config.name, dict(config.loss_weights)
    args.min_overlap_area = config.min_overlap_area


def _loader(dataset, batch_sampler=None, sampler=None, workers: int = 0, device=None) -> DataLoader:
    kwargs: dict[str, Any] = {"batch_sampler": batch_sampler} if batch_sampler is not None else {
        "batch_size": 1, "sampler": sampler}
    return DataLoader(dataset, num_workers=workers, collate_fn=loop.collate_fn,
                      pin_memory=device is not None and device.type == "cuda", **kwargs)


def _strip_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record without the printed summary lines (the numbers are there already)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "summary_lines"} if isinstance(v, dict) else v)
            for k, v in record.items()}


def _prepare(args: argparse.Namespace, info: DistInfo, log):
    """Checkpoint, start epoch, datasets, seed and model (on no device yet)."""
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    start_epoch = int(checkpoint["epoch"]) + 1 if checkpoint is not None else 0
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    pending_eval = checkpoint is not None and checkpoint.get("pending_eval") is not None
    if not args.test_only and start_epoch >= args.epochs and not pending_eval:
        raise UserError(f"--epochs {args.epochs}: nothing left to train from epoch {start_epoch}; ask for more epochs")
    resolve_resumed_flags(args, checkpoint)
    train_ds, val_ds = load_datasets(args)
    for dataset in (train_ds, val_ds):  # a broken val image is found now, not after a whole training epoch
        if dataset is not None:
            dataset.check_images(show_progress=info.is_main)
    _label_maps(val_ds, checkpoint, args.resume)
    if args.seed is None:  # one seed for all processes, kept across resumes
        ckpt_seed = (checkpoint or {}).get("args", {}).get("seed")
        args.seed = ckpt_seed if ckpt_seed is not None else distributed.broadcast_object(
            int.from_bytes(os.urandom(4), "little"))
    seed_everything(args.seed, 0, info.rank)
    model, config = build(args, val_ds.num_classes, checkpoint, log)
    match_stain(args, info, checkpoint, train_ds, val_ds, log)
    return checkpoint, start_epoch, train_ds, val_ds, model, config


def match_stain(args: argparse.Namespace, info: DistInfo, checkpoint: dict[str, Any] | None,
                train_ds: ChromosomeDataset | None, val_ds: ChromosomeDataset, log) -> None:
    """Decide the model's stain polarity (the checkpoint's, else the training images' majority) and mark the images
    that ``--stain`` inverts as they load; the polarity and the split go into ``args`` (``args.json``, checkpoints)."""
    saved = (checkpoint or {}).get("stain") or {}
    target, counts = saved.get("polarity"), saved.get("train_counts")

    def polarities(dataset: ChromosomeDataset) -> dict[int, str]:
        found = stain.dataset_polarities(dataset, show_progress=info.is_main) if info.is_main else None
        return distributed.broadcast_object(found)

    if train_ds is not None:
        train_polarity = polarities(train_ds)
        majority, counts = stain.majority(train_polarity.values())
        if target is None:
            target = majority if args.stain != "invert" else stain.POLARITIES[1 - stain.POLARITIES.index(majority)]
        train_ds.invert_ids = stain.images_to_invert(train_polarity, target, args.stain)
        log(f"stain: {counts[stain.BRIGHT_ON_DARK]} bright-on-dark and {counts[stain.DARK_ON_BRIGHT]} dark-on-bright "
            f"training image(s); the model learns {target} (--stain {args.stain}: {len(train_ds.invert_ids)} "
            f"inverted as they load)")
    elif info.is_main:
        stain.checkpoint_polarity(checkpoint or {}, args.resume, args.stain)  # the note for an older checkpoint
    stain.match_dataset(val_ds, target, args.stain, find=polarities)
    args.stain_polarity, args.stain_counts = target, counts


def run(args: argparse.Namespace, info: DistInfo, device: torch.device) -> None:
    """Train (or evaluate with ``--test-only``); raises the project's errors."""

    def log(message: str) -> None:
        if info.is_main:
            print(message, flush=True)

    checkpoint, start_epoch, train_ds, val_ds, model, config = _prepare(args, info, log)
    model.to(device)
    if args.amp is None:  # the reference setup trains with AMP; on the CPU float16 autocast is far slower
        args.amp = device.type == "cuda"
    amp_dtype = loop.amp_dtype_from_name(args.amp_dtype) if args.amp else None
    output_dir = Path(args.output_dir)
    val_loader = _loader(val_ds, sampler=ShardSampler(len(val_ds), info.world_size, info.rank),
                         workers=args.workers, device=device)
    evaluate = functools.partial(
        loop.evaluate, data_loader=val_loader, device=device, coco_gt=val_ds.coco,
        label_to_cat_id=val_ds.label_to_cat_id, score_thresh=args.score_thresh, label_names=val_ds.label_names,
        amp_dtype=amp_dtype, mask_threshold=args.mask_thresh, min_overlap_area=config.min_overlap_area,
        show_progress=info.is_main,
    )
    if args.test_only:
        record = evaluate(model)
        if info.is_main:
            txt, _ = write_record(record, output_dir)
            log(f"{format_summary(record)}\nrecord written to {txt}")
        return
    train_loader = _loader(
        train_ds,
        batch_sampler=train_batch_sampler(len(train_ds), train_ds.aspect_ratios(), args.batch_size,
                                          args.aspect_ratio_group_factor, info.world_size, info.rank, args.seed),
        workers=args.workers, device=device,
    )
    model, model_without_ddp = _wrap(model, args, info, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    optimizer, lr_scheduler, best_ap = _optimization(model_without_ddp, args, info, len(train_loader), checkpoint,
                                                     scaler, log, start_epoch)
    if info.is_main:
        try:
            prepare_output_dir(output_dir)
        except OSError as exc:
            raise UserError(str(exc)) from None
        for path in results.remove_unfinished_writes(output_dir):
            log(f"removed {path}, left by an interrupted checkpoint write")
    batches = len(train_loader)
    board = None
    if args.tensorboard and info.is_main:  # before the first step: a missing package is a one-line error
        board = TensorBoardLog(args.tensorboard_dir or output_dir / TENSORBOARD_DIR, purge_step=start_epoch * batches)
    if info.is_main:
        (output_dir / ARGS_JSON).write_text(json.dumps({**vars(args), "world_size": info.world_size}, indent=2) + "\n")
        save_label_json(val_ds.label_names, output_dir / LABELS_JSON)
        log(f"training {config.name} ({config.backbone}, {config.num_classes} class(es)) on {len(train_ds)} images, "
            f"{info.world_size} process(es) x batch {args.batch_size}, epochs {start_epoch}..{args.epochs - 1}, "
            f"output in {output_dir}")
    job = TrainingJob(args, info, model, model_without_ddp, optimizer, lr_scheduler, scaler, train_loader, evaluate,
                      config, val_ds, board)
    try:
        if checkpoint is not None and checkpoint.get("pending_eval") is not None:
            epoch = int(checkpoint["epoch"])
            log(f"evaluating epoch {epoch} first: {args.resume} was saved before its evaluation ended")
            best_ap = job.finish_epoch(epoch, dict(checkpoint["pending_eval"]), best_ap, evaluating=True)
        job.train_epochs(device, amp_dtype, start_epoch, best_ap)
    finally:
        if board is not None:
            board.close()


@dataclasses.dataclass
class TrainingJob:
    """What the epochs of a run share once it is set up."""

    args: argparse.Namespace
    info: DistInfo
    model: torch.nn.Module  # what trains: DistributedDataParallel in a distributed job
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None
    train_loader: DataLoader
    evaluate: Any
    config: Any
    val_ds: ChromosomeDataset
    board: TensorBoardLog | None

    def train_epochs(self, device: torch.device, amp_dtype: torch.dtype | None, start_epoch: int,
                     best_ap: float | None) -> None:
        """Epochs ``start_epoch .. --epochs - 1``: train, evaluate, and (process 0) write everything."""
        args, info, batches = self.args, self.info, len(self.train_loader)
        for epoch in range(start_epoch, args.epochs):
            self.train_loader.batch_sampler.set_epoch(epoch)
            seed_everything(args.seed, epoch + 1, info.rank)

            def on_log(iteration: int, values: dict[str, float], first: int = epoch * batches) -> None:
                if self.board is not None:
                    self.board.iteration(first + iteration, values)

            stats = loop.train_one_epoch(
                self.model, self.optimizer, self.train_loader, device, epoch, lr_scheduler=self.lr_scheduler,
                scaler=self.scaler, amp_dtype=amp_dtype, clip_grad_norm=args.clip_grad_norm,
                accumulate_steps=args.accumulate_steps, loss_weights=self.config.loss_weights,
                print_freq=args.print_freq, show_progress=info.is_main,
                on_log=on_log,
            )
            distributed.broadcast_buffers(self.model_without_ddp)  # process 0's BN statistics: the checkpointed model
            evaluating = (epoch + 1) % args.eval_interval == 0 or epoch == args.epochs - 1
            if evaluating and info.is_main and self.saves(epoch):  # the training is safe before the evaluation
                save_checkpoint({**self.state(epoch, best_ap), "pending_eval": stats},
                                Path(args.output_dir) / f"model_{epoch}.pth")
            best_ap = self.finish_epoch(epoch, stats, best_ap, evaluating)

    def finish_epoch(self, epoch: int, stats: dict[str, float], best_ap: float | None,
                     evaluating: bool) -> float | None:
        """Evaluate the trained epoch (when due) and write its files; returns the best segm AP so far."""
        record = None
        if evaluating:
            eval_start = time.perf_counter()
            record = self.evaluate(self.model_without_ddp)
            stats["eval_time_s"] = time.perf_counter() - eval_start
        segm_ap = record["segm"]["AP"] if record and record.get("segm") else None
        improved = segm_ap is not None and (best_ap is None or segm_ap > best_ap)
        if improved:
            best_ap = segm_ap
        if self.info.is_main:
            _end_epoch(Path(self.args.output_dir), epoch, stats, record, self.state(epoch, best_ap), improved,
                       self.args.keep_last, save=self.saves(epoch))
            if self.board is not None:
                self.board.epoch((epoch + 1) * len(self.train_loader) - 1, stats, record)
        return best_ap

    def saves(self, epoch: int) -> bool:
        """Whether ``model_<epoch>.pth`` is written (``--save-every``; always after the last epoch)."""
        return (epoch + 1) % self.args.save_every == 0 or epoch == self.args.epochs - 1

    def state(self, epoch: int, best_ap: float | None) -> dict[str, Any]:
        return checkpoint_state(self.model_without_ddp, self.optimizer, self.lr_scheduler, self.scaler, epoch,
                                self.args, self.config, self.val_ds, best_ap)


def _wrap(model: torch.nn.Module, args: argparse.Namespace, info: DistInfo, device: torch.device):
    """``(model to train, the bare model)``: SyncBatchNorm and DistributedDataParallel in a distributed job."""
    if args.sync_bn and info.distributed:
        if device.type != "cuda":
            raise UserError("--sync-bn needs GPUs (torch synchronises batch norm on CUDA devices only)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not info.distributed:
        return model, model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None), model


def _optimization(model: torch.nn.Module, args: argparse.Namespace, info: DistInfo, batches_per_epoch: int,
                  checkpoint: dict[str, Any] | None, scaler, log, start_epoch: int = 0):
    """The optimizer and per-step lr schedule, resumed from ``checkpoint``; the best segm AP so far.

    The resolved lr and warmup are written back into ``args``, so ``args.json`` records what ran.
    """
    lr, lr_line = resolve_lr(args, info.world_size)
    optimizer = make_optimizer(model, args, lr)
    steps_per_epoch = math.ceil(batches_per_epoch / args.accumulate_steps)
    lr_scheduler, warmup = make_schedule(optimizer, args, steps_per_epoch, 0 if checkpoint else start_epoch)
    log(f"{lr_line}; {args.lr_scheduler} schedule over {args.epochs} epochs of {steps_per_epoch} optimizer step(s), "
        f"warmup {warmup} step(s), gradient clipping {args.clip_grad_norm or 'off'}")
    best_ap = None
    if checkpoint is not None:
        saved_opt = (checkpoint.get("args") or {}).get("opt")
        if saved_opt is not None and saved_opt != args.opt:
            raise UserError(f"--opt {args.opt} but {args.resume} was trained with --opt {saved_opt}, whose state "
                            f"cannot drive {args.opt}; resume with --opt {saved_opt} (or start a new run)")
        try:
            best_ap = resume_training_state(checkpoint, optimizer, lr_scheduler, scaler, steps_per_epoch)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{args.resume}: its optimizer state does not fit this model and --opt {args.opt} "
                                  f"({one_line(exc) or type(exc).__name__})") from None
        saved_lr = lr_scheduler.base_lrs[0]
        if not math.isclose(saved_lr, lr, rel_tol=1e-9):
            schedule.set_base_lr(optimizer, lr_scheduler, lr)
            log(f"resuming with base lr {lr:g} instead of the checkpoint's {saved_lr:g}")
        log(f"resumed from {args.resume} (epoch {checkpoint['epoch']}, optimizer step {lr_scheduler.last_epoch})")
    args.lr, args.warmup_iters = lr, warmup
    return optimizer, lr_scheduler, best_ap


def _end_epoch(output_dir: Path, epoch: int, stats: dict[str, float], record: dict | None, state: dict[str, Any],
               improved: bool, keep_last: int, save: bool = True) -> None:
    """Process 0's writes after an epoch: result lines, checkpoints, plots, and the progress line."""
    _write_epoch(output_dir, epoch, stats, record)
    if save:
        save_checkpoint(state, output_dir / f"model_{epoch}.pth")
    if improved:
        save_checkpoint(state, output_dir / BEST_CHECKPOINT)
    prune_checkpoints(output_dir, keep_last)
    if record is not None:  # redrawn with each evaluation (the last epoch always has one), not every epoch
        plots.plot_all(results.read_jsonl(output_dir / results.METRICS_JSONL), output_dir)
    summary = f"  |  {format_summary(record)}" if record else ""
    print(f"epoch {epoch}: loss {stats['loss']:.4f}  lr {stats['lr']:.6f}  {stats['images_per_s']:.1f} img/s  "
        f"{stats['epoch_time_s']:.0f} s{summary}", flush=True)


def resume_training_state(checkpoint: dict[str, Any], optimizer: torch.optim.Optimizer, lr_scheduler,
                          scaler: torch.amp.GradScaler | None, steps_per_epoch: int) -> float | None:
    """Load the optimizer, lr schedule, scaler and RNG states; returns the best segm AP.

    A checkpoint from before the per-step schedule (``lr_schedule`` absent) is placed at its epoch's first step.
    """
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("lr_schedule") == LR_SCHEDULE_PER_STEP:
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    else:
        lr_scheduler.last_epoch = (int(checkpoint["epoch"]) + 1) * steps_per_epoch
        schedule.set_base_lr(optimizer, lr_scheduler, optimizer.param_groups[0].get("initial_lr", lr_scheduler.base_lrs[0]))
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    # CUDA states are left out: their number depends on the machine, and every epoch reseeds all devices
    restore_rng_state({k: v for k, v in checkpoint["rng_state"].items() if k != "cuda"})
    return checkpoint.get("best_segm_ap")


def checkpoint_state(model, optimizer, lr_scheduler, scaler, epoch: int, args: argparse.Namespace, config,
                     dataset: ChromosomeDataset, best_segm_ap: float | None) -> dict[str, Any]:
    """What ``model_<epoch>.pth`` holds (the SPEC's checkpoint format; ``weights_only``-loadable)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "lr_schedule": LR_SCHEDULE_PER_STEP,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "args": dict(vars(args)),
        "model_config": config.to_dict(),
        "label_names": dict(dataset.label_names),
        "label_to_cat_id": dict(dataset.label_to_cat_id),
        "rng_state": capture_rng_state(),
        "best_segm_ap": best_segm_ap,
        "stain": {"polarity": args.stain_polarity, "train_counts": args.stain_counts},
    }


def _write_epoch(output_dir: Path, epoch: int, stats: dict[str, float], record: dict | None) -> None:
    """The epoch's lines in det/seg_results.txt (when evaluated) and its metrics.jsonl record."""
    if record is not None:
        for iou_type, name in (("bbox", results.DET_RESULTS), ("segm", results.SEG_RESULTS)):
            if record.get(iou_type):
                line = results.format_epoch_line(epoch, record[iou_type]["stats"], stats["loss"], stats["lr"])
                results.write_epoch_line(output_dir / name, epoch, line)
    results.append_jsonl(output_dir / results.METRICS_JSONL,
                         {"epoch": epoch, **stats, **_strip_record(record or {})})


def main(args: argparse.Namespace) -> int:
    """Run the job; returns the exit status (2: a user error, 1: training failed). Project errors are printed as
    one line; in a distributed job a failing process prints its rank and reason and exits at once."""
    try:
        info, device = distributed.init_distributed(args.device, args.dist_timeout)
    except ValueError as exc:
        print_error(exc)
        return 2
    prefix = f"[rank {info.rank}] " if info.distributed else ""
    code = 0
    try:
        run(args, info, device)
    except USER_ERRORS as exc:
        distributed.announce_failure(info.rank)
        print_error(f"{prefix}{one_line(exc)}")
        code = 2
    except loop.NonFiniteLossError as exc:
        distributed.announce_failure(info.rank)
        print_error(f"{prefix}{exc}")
        code = 1
    except KeyboardInterrupt:
        print_error(f"{prefix}interrupted")
        code = 130
    except Exception as exc:
        if not info.distributed:
            raise
        culprit = distributed.failed_rank()
        if culprit is not None and culprit != info.rank:  # a collective broke because that process left: no traceback
            print_error(f"{prefix}stopped: rank {culprit} failed (its error is above)")
        else:
            distributed.announce_failure(info.rank)
            traceback.print_exc()  # the others stop too: their next collective fails, or torchrun ends them
            print_error(f"{prefix}failed: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        distributed.shutdown(code)
    return code
