"""Aspect-ratio grouped batches (alone and on top of DistributedSampler) and the evaluation shards."""
from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from train_utils.data.samplers import GroupedBatchSampler, ShardSampler, aspect_ratio_groups, train_batch_sampler


def test_aspect_ratio_groups():
    ratios = [0.3, 0.5, 0.8, 1.0, 1.0, 1.3, 2.0, 4.0]
    groups = aspect_ratio_groups(ratios, 3)
    assert groups[3] == groups[4]  # equal ratios share a bin
    assert groups == sorted(groups)  # bins follow the ratio
    assert groups[0] < groups[3] < groups[-1]
    assert aspect_ratio_groups(ratios, 0) == [0] * len(ratios)


def test_grouped_batches_are_pure_and_cover_every_index_once():
    group_ids = [0, 1, 0, 1, 0, 1, 0, 0, 1, 2]
    batches = list(GroupedBatchSampler(SequentialSampler(range(10)), group_ids, 2))
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert len(batches) == len(GroupedBatchSampler(SequentialSampler(range(10)), group_ids, 2)) == 5
    full = [b for b in batches if len(b) == 2]
    assert all(group_ids[b[0]] == group_ids[b[1]] for b in full[:4])  # the groups' own batches come first
    assert batches[0] == [0, 2] and batches[1] == [1, 3]


def test_grouped_batches_with_distributed_sampler_give_every_rank_the_same_steps():
    n, batch, world = 11, 3, 2
    group_ids = [i % 3 for i in range(n)]
    per_rank = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=7)
        grouped = GroupedBatchSampler(sampler, group_ids, batch)
        grouped.set_epoch(4)
        per_rank.append(list(grouped))
        assert len(per_rank[-1]) == len(grouped)
    assert len(per_rank[0]) == len(per_rank[1])  # no rank waits for a step that never comes
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(n))


def test_train_batch_sampler_order_depends_on_seed_and_epoch_only():
    def order(epoch, seed=0, factor=3):
        s = train_batch_sampler(8, [1.0, 0.5] * 4, 2, factor, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1, seed=1) != order(1)
    plain = order(0, factor=-1)
    assert sorted(i for b in plain for i in b) == list(range(8)) and all(len(b) == 2 for b in plain)
    grouped = order(0)
    ratios = [1.0, 0.5] * 4
    assert all(len({ratios[i] for i in b}) == 1 for b in grouped)


def test_shard_sampler_splits_without_padding():
    shards = [list(ShardSampler(7, 3, r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ShardSampler(7, 3, r)) for r in range(3)] == [3, 2, 2]
    assert list(ShardSampler(3)) == [0, 1, 2]
    loader = torch.utils.data.DataLoader(range(5), sampler=ShardSampler(5, 2, 1), batch_size=1)
    assert [int(x) for x in loader] == [1, 3]
