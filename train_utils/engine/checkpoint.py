"""Checkpoints: what a training checkpoint holds (``training_state``, the one writer of ``train.py`` and ``bench/``),
atomic saving, safe loading (``weights_only=True``), and rebuilding a model from a checkpoint alone."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from backbone.weights import describe_load_error
from errors import DaCSegError, UserError
from my_dataset_chromosome import ChromosomeDataset
from network_files import build_model
from network_files.config import ModelConfig
from train_utils.engine.run_config import Labels, StainSettings
from train_utils.engine.schedule import LR_SCHEDULE_PER_STEP
from train_utils.outputs.files import atomic_write


class CheckpointError(DaCSegError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                   scaler: torch.amp.GradScaler | None, epoch: int, *, record: Mapping[str, Any],
                   model_config: ModelConfig, labels: Labels, stain: StainSettings,
                   best_segm_ap: float | None = None) -> dict[str, Any]:
    """What ``model_<epoch>.pth`` holds (``weights_only``-loadable): the model and its config, the optimizer, lr
    schedule, scaler and RNG states a resume continues from, the run's ``record`` (``RunConfig.record()``), the labels
    and the stain polarity."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "lr_schedule": LR_SCHEDULE_PER_STEP,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "args": dict(record),
        "model_config": model_config.to_dict(),
        "label_names": dict(labels.names),
        "label_to_cat_id": dict(labels.to_cat_id),
        "rng_state": capture_rng_state(),
        "best_segm_ap": best_segm_ap,
        "stain": {"polarity": stain.polarity, "train_counts": stain.train_counts},
    }


def resume_training_state(checkpoint: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                          scaler: torch.amp.GradScaler | None) -> None:
    """Load the optimizer, scaler and RNG states of a checkpoint (the lr schedule: ``schedule.resume_schedule``)."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint["rng_state"])


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a run killed while saving leaves the previous file intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (a stranger's file cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds; the user needs one line (not its weights_only=False advice)
        raise CheckpointError(f"cannot read checkpoint {path}: {describe_load_error(exc)}") from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a DaCSeg checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def config_from_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike = "checkpoint") -> ModelConfig:
    """The ``ModelConfig`` a checkpoint was trained with."""
    if "model_config" not in checkpoint or "model" not in checkpoint:
        raise CheckpointError(f"{path} has no model config; it was not written by DaCSeg's train.py")
    try:
        return ModelConfig.from_dict(dict(checkpoint["model_config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad model config: {exc}") from exc


def model_from_checkpoint(
    checkpoint: dict[str, Any], path: str | os.PathLike = "checkpoint", device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelConfig]:
    """Rebuild the model a loaded checkpoint describes and load its weights; returns (model in eval mode, config)."""
    config = config_from_checkpoint(checkpoint, path)
    model = build_model(config, load_codebook=False)  # a shape prior's codebook is in the state dict
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit a {config.name} model: {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval(), config


def load_model_from_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any]]:
    """Read a checkpoint and rebuild its model; returns (model in eval mode, config, checkpoint)."""
    checkpoint = load_checkpoint(path)
    return (*model_from_checkpoint(checkpoint, path, device), checkpoint)


def checkpoint_label_map(checkpoint: Mapping[str, Any], dataset: ChromosomeDataset, path: object) -> dict[int, int]:
    """The checkpoint's label -> COCO category id map, which must be the dataset's (``UserError`` naming both)."""
    saved = checkpoint.get("label_to_cat_id")
    labels = dataset.label_to_cat_id if saved is None else {int(k): int(v) for k, v in saved.items()}
    if labels != dataset.label_to_cat_id:
        raise UserError(f"{path} was trained on categories {labels} (label: COCO id) but {dataset.ann_file} has "
                        f"{dataset.label_to_cat_id}")
    return labels


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a ``weights_only``-safe form. (CUDA generators are left out: their
    number depends on the machine, and every epoch reseeds all devices.)"""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``model_<epoch>.pth`` files (``best.pth`` is never touched)."""
    if keep_last <= 0:
        return []
    found = []
    for p in Path(output_dir).glob("model_*.pth"):
        suffix = p.stem.split("_", 1)[1]
        if suffix.isdigit():
            found.append((int(suffix), p))
    removed = [p for _, p in sorted(found)[:-keep_last]]
    for p in removed:
        p.unlink()
    return removed
