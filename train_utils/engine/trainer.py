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
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from errors import DaCSegError, UserError, one_line, print_error
from my_dataset_chromosome import ChromosomeDataset, save_label_json
from train_utils.engine import distributed, loop, schedule, setup
from train_utils.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from train_utils.engine.distributed import DistInfo
from train_utils.evaluation import score
from train_utils.outputs import plots, results
from train_utils.outputs.files import (
    check_output_dir,
    prepare_output_dir,
    remove_unfinished_writes,
    write_text_atomic,
)
from train_utils.outputs.record import format_summary, write_record
from train_utils.outputs.tensorboard import TENSORBOARD_DIR, TensorBoardLog, check_log_dir

ARGS_JSON = "args.json"
LABELS_JSON = "labels.json"
BEST_CHECKPOINT = "best.pth"
LR_SCHEDULE_PER_STEP = "per_step"  # checkpoints' lr_scheduler counts optimizer steps (older ones counted epochs)


def _strip_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record without the printed summary lines (the numbers are there already)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "summary_lines"} if isinstance(v, dict) else v)
            for k, v in record.items()}


def run(args: argparse.Namespace, info: DistInfo, device: torch.device) -> None:
    """Train (or evaluate with ``--test-only``); raises the project's errors."""

    def log(message: str) -> None:
        if info.is_main:
            print(message, flush=True)

    if info.is_main:
        check_outputs(args)
    checkpoint, start_epoch, train_ds, val_ds, model, config = setup.prepare(args, info, device, log)
    model.to(device)
    amp_dtype = loop.resolve_amp(args.amp, args.amp_dtype, device)
    evaluate = functools.partial(
        score.evaluate, data_loader=score.evaluation_loader(val_ds, args.workers, device, 1, info.world_size, info.rank),
        device=device, coco_gt=val_ds.coco, label_to_cat_id=val_ds.label_to_cat_id, score_thresh=args.score_thresh,
        label_names=val_ds.label_names, amp_dtype=amp_dtype, mask_threshold=args.mask_thresh,
        min_overlap_area=config.min_overlap_area, show_progress=info.is_main,
    )
    if args.test_only:
        record = evaluate(model)
        if info.is_main:
            txt, _ = write_record(record, Path(args.output_dir))
            log(f"{format_summary(record)}\nrecord written to {txt}")
        return
    job = _training_job(args, info, device, model, config, train_ds, val_ds, checkpoint, start_epoch, evaluate, log)
    try:
        best_ap = job.best_ap
        if checkpoint is not None and checkpoint.get("pending_eval") is not None:
            epoch = int(checkpoint["epoch"])
            log(f"evaluating epoch {epoch} first: {args.resume} was saved before its evaluation ended")
            best_ap = job.finish_epoch(epoch, dict(checkpoint["pending_eval"]), best_ap, evaluating=True)
        job.train_epochs(device, amp_dtype, start_epoch, best_ap)
    finally:
        if job.board is not None:
            job.board.close()


def tensorboard_dir(args: argparse.Namespace) -> tuple[Path, str]:
    """Where ``--tensorboard`` writes, and the flag that chose it."""
    if args.tensorboard_dir is not None:
        return Path(args.tensorboard_dir), "--tensorboard-dir"
    return Path(args.output_dir) / TENSORBOARD_DIR, "--tensorboard"


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before anything is read or created, an ``--output-dir`` or TensorBoard folder that cannot be
    written (a file in the way, no permission) and ``--tensorboard`` without its package: a run refused for its
    flags leaves nothing on disk."""
    try:
        check_output_dir(args.output_dir)
    except OSError as exc:
        raise UserError(str(exc)) from None
    if args.tensorboard and not args.test_only:
        check_log_dir(*tensorboard_dir(args))


def _training_job(args, info: DistInfo, device: torch.device, model, config, train_ds: ChromosomeDataset,
                  val_ds: ChromosomeDataset, checkpoint, start_epoch: int, evaluate, log) -> "TrainingJob":
    """Loader, DDP, optimizer, schedule and scaler (resumed from ``checkpoint``); process 0 readies the output
    folder and writes ``args.json`` and ``labels.json``."""
    train_loader = setup.training_loader(train_ds, args, device, info.world_size, info.rank)
    model, model_without_ddp = _wrap(model, args, info, device)
    scaler = torch.amp.GradScaler(device.type) if args.amp and args.amp_dtype == "float16" else None
    optimizer, lr_scheduler, best_ap = _optimization(model_without_ddp, args, info, len(train_loader), checkpoint,
                                                     scaler, log, start_epoch)
    output_dir, board = Path(args.output_dir), None
    if info.is_main:
        try:
            prepare_output_dir(output_dir)
        except OSError as exc:
            raise UserError(str(exc)) from None
        for path in remove_unfinished_writes(output_dir):
            log(f"removed {path}, left by an interrupted checkpoint write")
        if args.tensorboard:  # check_outputs refused a missing package or an unwritable folder already
            board = TensorBoardLog(tensorboard_dir(args)[0], purge_step=start_epoch * len(train_loader))
        recorded = {**vars(args), "world_size": info.world_size}
        write_text_atomic(output_dir / ARGS_JSON, json.dumps(recorded, indent=2) + "\n")
        save_label_json(val_ds.label_names, output_dir / LABELS_JSON)
        log(f"training {config.name} ({config.backbone}, {config.num_classes} class(es)) on {len(train_ds)} images, "
            f"{info.world_size} process(es) x batch {args.batch_size}, epochs {start_epoch}..{args.epochs - 1}, "
            f"output in {output_dir}")
    return TrainingJob(args, info, model, model_without_ddp, optimizer, lr_scheduler, scaler, train_loader, evaluate,
                       config, val_ds, board, best_ap)


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
    best_ap: float | None = None  # the best segm AP before this run (a resumed checkpoint's)

    def train_epochs(self, device: torch.device, amp_dtype: torch.dtype | None, start_epoch: int,
                     best_ap: float | None) -> None:
        """Epochs ``start_epoch .. --epochs - 1``: train, evaluate, and (process 0) write everything."""
        args, info, batches = self.args, self.info, len(self.train_loader)
        for epoch in range(start_epoch, args.epochs):
            self.train_loader.batch_sampler.set_epoch(epoch)
            setup.seed_everything(args.seed, epoch + 1, info.rank)

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

    The resolved accumulation, lr and warmup are written back into ``args``, so ``args.json`` records what ran.
    """
    note = setup.fit_accumulation(args, batches_per_epoch)
    if note is not None:
        log(note)
    lr, lr_line = setup.resolve_lr(args, info.world_size)
    optimizer = setup.make_optimizer(model, args, lr)
    steps_per_epoch = math.ceil(batches_per_epoch / args.accumulate_steps)
    lr_scheduler, warmup = setup.make_schedule(optimizer, args, steps_per_epoch, 0 if checkpoint else start_epoch)
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
    restore_rng_state(checkpoint["rng_state"])
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
