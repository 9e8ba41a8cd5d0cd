"""Data loaders of the training run and of the scoring: the batches a detection model takes, and each process's
share of a dataset."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from train_utils.data.samplers import ShardSampler, train_batch_sampler


def collate_fn(batch: Sequence[tuple[Any, Any]]) -> tuple[tuple[Any, ...], ...]:
    """``[(image, target), ...]`` -> ``(images, targets)``: detection models take lists, not stacked tensors."""
    return tuple(zip(*batch))


def training_loader(dataset: Dataset, aspect_ratios: Sequence[float] | None, *, batch_size: int, group_factor: int,
                    workers: int, seed: int, device: torch.device, world_size: int = 1, rank: int = 0) -> DataLoader:
    """This process's batches of the training set: aspect-ratio groups of ``batch_size`` images, reshuffled per epoch
    from the seed (``set_epoch``)."""
    sampler = train_batch_sampler(len(dataset), aspect_ratios, batch_size, group_factor, world_size, rank, seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=device.type == "cuda")


def evaluation_loader(dataset: Dataset, workers: int, device: torch.device, batch_size: int = 1,
                      world_size: int = 1, rank: int = 0) -> DataLoader:
    """This process's shard of ``dataset`` in order (all of it in a one-process job)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), world_size, rank),
                      num_workers=workers, collate_fn=collate_fn, pin_memory=device.type == "cuda")
