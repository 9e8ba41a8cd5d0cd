"""Batch samplers: aspect-ratio grouping on top of any index sampler, and an evaluation shard sampler."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def aspect_ratio_groups(aspect_ratios: Sequence[float], k: int) -> list[int]:
    """Group id of each image: the bin of its aspect ratio (width / height) among ``2k + 1`` bins spaced evenly in
    log2 between 1/2 and 2 (ratios beyond fall in the outer bins). ``k = 0`` puts everything in one group."""
    if k <= 0:
        return [0] * len(aspect_ratios)
    edges = np.logspace(-1, 1, num=2 * k + 1, base=2.0)
    return [int(g) for g in np.digitize(np.asarray(aspect_ratios, dtype=np.float64), edges)]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices from ``sampler`` whose items share a group (e.g. an aspect-ratio bin).

    Indices are taken in the sampler's order and batched per group as soon as a group has ``batch_size`` of them;
    what is left at the end is batched in sampler order, so every index is used once and there are exactly
    ``ceil(len(sampler) / batch_size)`` batches: with a ``DistributedSampler`` every process gets as many steps.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        pending: dict[int, list[int]] = {}
        for index in self.sampler:
            bucket = pending.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket
                pending[self.group_ids[index]] = []
        # what is left: each group's leftovers together, groups in the order they were first seen
        leftovers = [index for bucket in pending.values() for index in bucket]
        for start in range(0, len(leftovers), self.batch_size):
            yield leftovers[start:start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the index sampler (``DistributedSampler`` reshuffles with it)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index starting at ``rank``, in order, without padding or repeats.

    For evaluation: the shards of all processes together are the dataset exactly once, so the metrics of the
    gathered results equal a one-process evaluation.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.num_replicas))


def train_batch_sampler(
    dataset_len: int,
    aspect_ratios: Sequence[float] | None,
    batch_size: int,
    group_factor: int,
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
) -> GroupedBatchSampler | torch.utils.data.BatchSampler:
    """The training batch sampler: a shuffling ``DistributedSampler`` (one replica when not distributed; its order
    depends only on ``seed`` and the epoch given to ``set_epoch``), batched by aspect-ratio group when
    ``group_factor >= 0``."""
    sampler = torch.utils.data.DistributedSampler(
        range(dataset_len), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    if group_factor >= 0 and aspect_ratios is not None:
        return GroupedBatchSampler(sampler, aspect_ratio_groups(aspect_ratios, group_factor), batch_size)
    return _EpochBatchSampler(sampler, batch_size, drop_last=False)


class _EpochBatchSampler(torch.utils.data.BatchSampler):
    """``BatchSampler`` that forwards ``set_epoch`` to its sampler."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
