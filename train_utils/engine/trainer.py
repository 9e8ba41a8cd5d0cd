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

The run reads one ``RunConfig``, made by ``setup.resolve_run`` before anything is written; ``args.json`` and every
checkpoint's ``args`` are its ``record()``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from errors import DaCSegError, UserError, one_line, print_error
from my_dataset_chromosome import save_label_json
from train_utils import distributed
from train_utils.data.loaders import evaluation_loader
from train_utils.distributed import DistInfo
from train_utils.engine import loop, schedule, setup
from train_utils.engine.checkpoint import (
    CheckpointError,
    prune_checkpoints,
    resume_training_state,
    save_checkpoint,
    training_state,
)
from train_utils.engine.run_config import RunConfig
from train_utils.engine.setup import RunInputs
from train_utils.evaluation import score
from train_utils.outputs import plots, results
from train_utils.outputs.files import prepare_output_dir, remove_unfinished_writes, write_text_atomic
from train_utils.outputs.record import format_summary, write_record
from train_utils.outputs.tensorboard import TensorBoardLog

ARGS_JSON = "args.json"
LABELS_JSON = "labels.json"
BEST_CHECKPOINT = "best.pth"


def _strip_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record without the printed summary lines (the numbers are there already)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "summary_lines"} if isinstance(v, dict) else v)
            for k, v in record.items()}


def run(args: argparse.Namespace, info: DistInfo, device: torch.device) -> None:
    """Train (or evaluate with ``--test-only``); raises the project's errors."""

    def log(message: str) -> None:
        if info.is_main:
            print(message, flush=True)

    config, inputs = setup.resolve_run(args, info, device, log)
    setup.seed_everything(config.seed, 0, info.rank)
    model = setup.build_run_model(config, inputs.checkpoint, log, inputs.pretrained_lines).to(device)
    for note in inputs.notes:
        log(note)
    val_ds = inputs.val_ds
    amp_dtype = loop.amp_dtype_from_name(config.amp_dtype)
    evaluate = functools.partial(
        score.evaluate, data_loader=evaluation_loader(val_ds, config.data.workers, device, 1, info.world_size,
                                                      info.rank),
        device=device, coco_gt=val_ds.coco, label_to_cat_id=val_ds.label_to_cat_id,
        score_thresh=config.score_thresh, label_names=val_ds.label_names, amp_dtype=amp_dtype,
        mask_threshold=config.mask_thresh, min_overlap_area=config.model.min_overlap_area, show_progress=info.is_main,
    )
    if config.test_only:
        record = evaluate(model)
        if info.is_main:
            txt, _ = write_record(record, config.output.output_dir)
            log(f"{format_summary(record)}\nrecord written to {txt}")
        return
    job = _training_job(config, inputs, info, device, model, evaluate, log)
    try:
        best_ap = job.best_ap
        checkpoint = inputs.checkpoint
        if checkpoint is not None and checkpoint.get("pending_eval") is not None:
            epoch = int(checkpoint["epoch"])
            log(f"evaluating epoch {epoch} first: {config.resume} was saved before its evaluation ended")
            best_ap = job.finish_epoch(epoch, dict(checkpoint["pending_eval"]), best_ap, evaluating=True)
        job.train_epochs(device, amp_dtype, config.start_epoch, best_ap)
    finally:
        if job.board is not None:
            job.board.close()


def _training_job(config: RunConfig, inputs: RunInputs, info: DistInfo, device: torch.device,
                  model: torch.nn.Module, evaluate, log) -> "TrainingJob":
    """Loader, DDP, optimizer, schedule and scaler (resumed from the checkpoint); process 0 readies the output
    folder and writes ``args.json`` and ``labels.json``."""
    train_loader = setup.training_loader(inputs.train_ds, config.data, config.seed, device, info)
    model, model_without_ddp = _wrap(model, config.sync_bn, info, device)
    scaler = torch.amp.GradScaler(device.type) if config.amp_dtype == "float16" else None
    optimizer, lr_scheduler, best_ap = _optimization(model_without_ddp, config, inputs.checkpoint, scaler, log)
    output_dir, board = config.output.output_dir, None
    if info.is_main:
        try:
            prepare_output_dir(output_dir)
        except OSError as exc:
            raise UserError(str(exc)) from None
        for path in remove_unfinished_writes(output_dir):
            log(f"removed {path}, left by an interrupted checkpoint write")
        if config.output.tensorboard_dir is not None:  # check_outputs refused a missing package or a bad folder
            board = TensorBoardLog(config.output.tensorboard_dir,
                                   purge_step=config.start_epoch * len(train_loader))
        recorded = {**config.record(), "world_size": info.world_size}
        write_text_atomic(output_dir / ARGS_JSON, json.dumps(recorded, indent=2) + "\n")
        save_label_json(config.data.labels.names, output_dir / LABELS_JSON)
        log(f"training {config.model.name} ({config.model.backbone}, {config.model.num_classes} class(es)) on "
            f"{len(inputs.train_ds)} images, {info.world_size} process(es) x batch {config.data.batch_size}, epochs "
            f"{config.start_epoch}..{config.schedule.epochs - 1}, output in {output_dir}")
    return TrainingJob(config, info, model, model_without_ddp, optimizer, lr_scheduler, scaler, train_loader,
                       evaluate, board, best_ap)


@dataclasses.dataclass
class TrainingJob:
    """What the epochs of a run share once it is set up."""

    config: RunConfig
    info: DistInfo
    model: torch.nn.Module  # what trains: DistributedDataParallel in a distributed job
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None
    train_loader: DataLoader
    evaluate: Any
    board: TensorBoardLog | None
    best_ap: float | None = None  # the best segm AP before this run (a resumed checkpoint's)

    def train_epochs(self, device: torch.device, amp_dtype: torch.dtype | None, start_epoch: int,
                     best_ap: float | None) -> None:
        """Epochs ``start_epoch .. --epochs - 1``: train, evaluate, and (process 0) write everything."""
        config, info, batches = self.config, self.info, len(self.train_loader)
        epochs = config.schedule.epochs
        for epoch in range(start_epoch, epochs):
            self.train_loader.batch_sampler.set_epoch(epoch)
            setup.seed_everything(config.seed, epoch + 1, info.rank)

            def on_log(iteration: int, values: dict[str, float], first: int = epoch * batches) -> None:
                if self.board is not None:
                    self.board.iteration(first + iteration, values)

            stats = loop.train_one_epoch(
                self.model, self.optimizer, self.train_loader, device, epoch, lr_scheduler=self.lr_scheduler,
                scaler=self.scaler, amp_dtype=amp_dtype, clip_grad_norm=config.optimizer.clip_grad_norm,
                accumulate_steps=config.optimizer.accumulate_steps, loss_weights=config.model.loss_weights,
                print_freq=config.output.print_freq, show_progress=info.is_main,
                on_log=on_log,
            )
            distributed.broadcast_buffers(self.model_without_ddp)  # process 0's BN statistics: the checkpointed model
            evaluating = (epoch + 1) % config.output.eval_interval == 0 or epoch == epochs - 1
            if evaluating and info.is_main and self.saves(epoch):  # the training is safe before the evaluation
                save_checkpoint({**self.state(epoch, best_ap), "pending_eval": stats},
                                config.output.output_dir / f"model_{epoch}.pth")
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
            _end_epoch(self.config.output.output_dir, epoch, stats, record, self.state(epoch, best_ap), improved,
                       self.config.output.keep_last, save=self.saves(epoch))
            if self.board is not None:
                self.board.epoch((epoch + 1) * len(self.train_loader) - 1, stats, record)
        return best_ap

    def saves(self, epoch: int) -> bool:
        """Whether ``model_<epoch>.pth`` is written (``--save-every``; always after the last epoch)."""
        return (epoch + 1) % self.config.output.save_every == 0 or epoch == self.config.schedule.epochs - 1

    def state(self, epoch: int, best_ap: float | None) -> dict[str, Any]:
        config = self.config
        return training_state(self.model_without_ddp, self.optimizer, self.lr_scheduler, self.scaler, epoch,
                              record=config.record(), model_config=config.model, labels=config.data.labels,
                              stain=config.data.stain, best_segm_ap=best_ap)


def _wrap(model: torch.nn.Module, sync_bn: bool, info: DistInfo, device: torch.device):
    """``(model to train, the bare model)``: SyncBatchNorm and DistributedDataParallel in a distributed job."""
    if not info.distributed:
        return model, model
    if sync_bn:  # resolve_run refused it without GPUs
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None), model


def _optimization(model: torch.nn.Module, config: RunConfig, checkpoint: dict[str, Any] | None, scaler, log):
    """The optimizer and per-step lr schedule, resumed from ``checkpoint``; the best segm AP so far."""
    optimizer = setup.make_optimizer(model, config.optimizer)
    steps_per_epoch = config.schedule.steps_per_epoch
    lr_scheduler = schedule.make_schedule(optimizer, config.schedule,
                                          0 if checkpoint else config.start_epoch * steps_per_epoch)
    if checkpoint is None:
        return optimizer, lr_scheduler, None
    try:
        resume_training_state(checkpoint, optimizer, scaler)
        note = schedule.resume_schedule(optimizer, lr_scheduler, checkpoint["lr_scheduler"], config.optimizer.lr)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{config.resume}: its optimizer state does not fit this model and --opt "
                              f"{config.optimizer.name} ({one_line(exc) or type(exc).__name__})") from None
    if note is not None:
        log(note)
    log(f"resumed from {config.resume} (epoch {checkpoint['epoch']}, optimizer step {lr_scheduler.last_epoch})")
    return optimizer, lr_scheduler, checkpoint.get("best_segm_ap")


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
    except DaCSegError as exc:
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
