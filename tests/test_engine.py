"""The training step (warmup, clipping, AMP, non-finite losses) on a stand-in model, and evaluation/inference
through the real COCO pipeline with oracle and empty predictions."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from my_dataset_chromosome import ChromosomeDataset
from train_utils.engine import loop, schedule
from train_utils.engine.samplers import ShardSampler
from train_utils.outputs import results
from transforms import get_transform


class StandIn(nn.Module):
    """Returns two loss terms like a detector in training mode; records what it saw."""

    def __init__(self, optimizer_probe=None, nan_at: int | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0, -1.0]))
        self.lin = nn.Linear(2, 1)
        self.nan_at, self.scale = nan_at, scale
        self.probe = optimizer_probe
        self.seen_lrs: list[float] = []
        self.seen_losses: list[float] = []

    def forward(self, images, targets=None):
        if self.probe is not None:
            self.seen_lrs.append(self.probe.param_groups[0]["lr"])
        a = ((self.w - 1) ** 2).sum() * len(images) * self.scale
        b = self.lin(self.w[None]).float().abs().sum() * 0.1
        if self.nan_at == len(self.seen_losses):
            b = b * float("nan")
        self.seen_losses.append([a.item(), b.item()])
        return {"loss_a": a, "loss_b": b}


def _batches(n: int, batch: int = 2):
    return [(tuple(torch.zeros(3, 4, 4) for _ in range(batch)), tuple({"image_id": i} for _ in range(batch)))
            for i in range(n)]


def test_collate_fn_and_amp_dtype():
    assert loop.collate_fn([(1, "a"), (2, "b")]) == ((1, 2), ("a", "b"))
    assert loop.amp_dtype_from_name("bfloat16") is torch.bfloat16 and loop.amp_dtype_from_name(None) is None


def test_scheduler_steps_once_per_optimizer_step_across_epochs():
    model = StandIn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.probe = optimizer
    lr_scheduler = schedule.make_lr_scheduler(optimizer, total_steps=100, steps_per_epoch=5, warmup_iters=8,
                                              warmup_factor=0.01)
    for epoch in range(2):
        stats = loop.train_one_epoch(model, optimizer, _batches(5), torch.device("cpu"), epoch,
                                       lr_scheduler=lr_scheduler, show_progress=False)
        assert stats["optimizer_steps"] == 5
    factor = functools.partial(schedule.lr_factor, total_steps=100, steps_per_epoch=5, warmup_iters=8,
                               warmup_factor=0.01)
    assert model.seen_lrs == pytest.approx([0.1 * factor(i) for i in range(10)])
    assert stats["lr"] == pytest.approx(0.1 * factor(9))  # the lr of the epoch's last step


def test_train_one_epoch_means():
    model = StandIn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = loop.train_one_epoch(model, optimizer, _batches(5), torch.device("cpu"), 0, show_progress=False)
    a, b = zip(*model.seen_losses)
    assert stats["loss_a"] == pytest.approx(sum(a) / 5) and stats["loss_b"] == pytest.approx(sum(b) / 5)
    assert stats["loss"] == pytest.approx((sum(a) + sum(b)) / 5)
    assert stats["images_per_s"] > 0 and stats["epoch_time_s"] > 0 and stats["lr"] == 0.1
    assert model.training


def test_loss_weights_weigh_the_minimised_loss_and_the_logged_terms_stay_raw():
    weights = {"loss_a": 0.0, "loss_b": 3.0}
    logged = []
    model = StandIn()
    w_before = model.w.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = loop.train_one_epoch(model, optimizer, _batches(3), torch.device("cpu"), 0, loss_weights=weights,
                                   print_freq=1, show_progress=False, on_log=lambda i, v: logged.append(v))
    a, b = zip(*model.seen_losses)
    assert stats["loss_a"] == pytest.approx(sum(a) / 3) and stats["loss_b"] == pytest.approx(sum(b) / 3)  # raw
    assert stats["loss"] == pytest.approx(3 * sum(b) / 3)  # what was minimised: 0 x loss_a + 3 x loss_b
    assert logged[0]["loss_a"] == pytest.approx(a[0]) and logged[0]["loss"] == pytest.approx(3 * b[0])
    # a weight of 0 keeps the term's gradient out: the same steps as a model whose loss_a is 0
    weighted, zeroed = StandIn(), StandIn(scale=0.0)
    zeroed.load_state_dict(weighted.state_dict())
    for net, weights in ((weighted, {"loss_a": 0.0}), (zeroed, None)):
        loop.train_one_epoch(net, torch.optim.SGD(net.parameters(), lr=0.1), _batches(3), torch.device("cpu"), 0,
                               loss_weights=weights, show_progress=False)
    assert torch.allclose(weighted.w, zeroed.w) and not torch.equal(weighted.w, w_before)
    assert loop.weighted_loss({"x": torch.tensor(2.0), "y": torch.tensor(5.0)}, {"y": 0.5}).item() == 4.5


class Linear(nn.Module):
    """A least-squares 'detector': its loss is the batch mean, so a batch of 2 equals two accumulated batches of 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)

    def forward(self, images, targets=None):
        x = torch.stack([image.flatten()[:3] for image in images])
        y = torch.stack([t["y"] for t in targets])
        return {"loss_fit": ((self.lin(x).squeeze(1) - y) ** 2).mean()}


def _regression_batches(batch: int, count: int = 4):
    torch.manual_seed(1)
    samples = [(torch.randn(3, 1, 1), {"y": torch.randn(())}) for _ in range(count)]
    return [loop.collate_fn(samples[i:i + batch]) for i in range(0, count, batch)]


def _gradient(model, loader, accumulate_steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # a step that keeps the weights: look at the gradient
    grads = []

    def zero_grad(set_to_none=True):  # record each applied gradient, then clear it
        if model.lin.weight.grad is not None:
            grads.append([p.grad.clone() for p in model.parameters()])
        for p in model.parameters():
            p.grad = None

    optimizer.zero_grad = zero_grad
    loop.train_one_epoch(model, optimizer, loader, torch.device("cpu"), 0, accumulate_steps=accumulate_steps,
                           show_progress=False)
    return grads


def test_accumulation_equals_the_larger_batch():
    big = _gradient(Linear(), _regression_batches(2), accumulate_steps=1)
    accumulated = _gradient(Linear(), _regression_batches(1), accumulate_steps=2)
    assert len(big) == len(accumulated) == 2
    for a, b in zip(big, accumulated):
        for ga, gb in zip(a, b):
            assert torch.allclose(ga, gb, atol=1e-6)


def test_accumulation_counts_optimizer_steps_and_scales_a_partial_group():
    model = Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lr_scheduler = schedule.make_lr_scheduler(optimizer, total_steps=10, steps_per_epoch=2)
    stats = loop.train_one_epoch(model, optimizer, _regression_batches(1, count=3), torch.device("cpu"), 0,
                                   lr_scheduler=lr_scheduler, accumulate_steps=2, show_progress=False)
    assert stats["optimizer_steps"] == 2 and lr_scheduler.last_epoch == 2
    # the last, partial group (one batch) weighs like a whole batch: its gradient is that batch's own
    last_alone = _gradient(Linear(), _regression_batches(1, count=3)[2:], accumulate_steps=1)
    partial = _gradient(Linear(), _regression_batches(1, count=3), accumulate_steps=2)
    assert len(partial) == 2
    first_two = _gradient(Linear(), _regression_batches(2, count=2), accumulate_steps=1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(partial[0], first_two[0]))
    # the same start weights (lr 0): the partial group's gradient is the third batch's alone
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(partial[1], last_alone[0]))


def test_clip_grad_norm_bounds_the_step():
    model = StandIn(scale=1e4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loop.train_one_epoch(model, optimizer, _batches(1), torch.device("cpu"), 0, clip_grad_norm=0.01,
                           show_progress=False)
    step = torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), before)])
    assert 0 < step.norm() <= 0.01 + 1e-6


def test_non_finite_loss_stops_before_the_step():
    model = StandIn(nan_at=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []
    original_step = optimizer.step

    def step(*args, **kwargs):
        out = original_step(*args, **kwargs)
        snapshots.append(model.w.detach().clone())
        return out

    optimizer.step = step
    with pytest.raises(loop.NonFiniteLossError) as exc:
        loop.train_one_epoch(model, optimizer, _batches(5), torch.device("cpu"), 7, show_progress=False)
    message = str(exc.value)
    assert "epoch 7, iteration 2" in message and "loss_b=nan" in message and "loss_a=" in message
    assert "\n" not in message
    assert len(snapshots) == 2 and torch.equal(model.w.detach(), snapshots[-1])  # no step on the bad loss


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_paths_run(dtype):
    model = StandIn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp_dtype = loop.amp_dtype_from_name(dtype)
    scaler = torch.amp.GradScaler("cpu") if amp_dtype is torch.float16 else None
    before = model.w.detach().clone()
    stats = loop.train_one_epoch(model, optimizer, _batches(3), torch.device("cpu"), 0, scaler=scaler,
                                   amp_dtype=amp_dtype, clip_grad_norm=10.0, show_progress=False)
    assert torch.isfinite(torch.tensor(stats["loss"])) and not torch.equal(before, model.w.detach())


# ---- evaluation through the real pipeline -------------------------------------------------------------------


class Oracle(nn.Module):
    """Answers each image, in loader order, with the given outputs (eval mode only)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images, targets=None):
        assert not self.training
        return [self.outputs.pop(0) for _ in images]


@pytest.fixture(scope="module")
def val_ds(tiny_coco):
    return ChromosomeDataset(tiny_coco, "val", transforms=get_transform("none", train=False))


def _loader(ds):
    return DataLoader(ds, batch_size=1, sampler=ShardSampler(len(ds)), collate_fn=loop.collate_fn)


def _ground_truth_outputs(ds):
    outputs = []
    for i in range(len(ds)):
        _, target = ds[i]
        n = len(target["labels"])
        outputs.append({"boxes": target["boxes"].as_subclass(torch.Tensor).float(), "labels": target["labels"],
                        "scores": torch.ones(n), "masks": target["masks"].as_subclass(torch.Tensor)[:, None].float()})
    return outputs


def _evaluate(model, ds):
    return loop.evaluate(model, _loader(ds), torch.device("cpu"), ds.coco, ds.label_to_cat_id, 0.5,
                           label_names=ds.label_names)


def test_evaluate_oracle_predictions_score_one(val_ds):
    record = _evaluate(Oracle(_ground_truth_outputs(val_ds)), val_ds)
    assert record["segm"]["AP"] == pytest.approx(1.0) and record["bbox"]["AP"] > 0.9
    assert record["precision"] == record["recall"] == record["f1"] == pytest.approx(1.0)
    assert record["segm"]["per_class_AP50"] == {"chromosome": pytest.approx(1.0)}
    assert record["count_mae"] == 0


def test_evaluate_with_zero_predictions(val_ds):
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 128, 160)}
    record = _evaluate(Oracle([dict(empty) for _ in range(len(val_ds))]), val_ds)
    assert len(record["segm"]["stats"]) == len(record["bbox"]["stats"]) == 12
    assert record["segm"]["AP"] <= 0 and record["recall"] == 0 and record["count_mae"] == 4
    line = results.format_epoch_line(0, record["segm"]["stats"], 1.0, 0.02)
    assert line.startswith("epoch:0 ") and len(line.split("  ")) == 14


class ContentOracle(nn.Module):
    """Recognises each image by its pixel sum and answers with imperfect predictions: every ground-truth instance
    but the last (score 0.9), plus a shifted false positive (score 0.7) — so AP is neither 0 nor 1."""

    def __init__(self, ds):
        super().__init__()
        self.answers = {}
        for i in range(len(ds)):
            image, target = ds[i]
            masks = target["masks"].as_subclass(torch.Tensor)
            n = len(masks) - 1
            wrong = torch.roll(masks[:1], shifts=(9, 9), dims=(1, 2))
            all_masks = torch.cat([masks[:n], wrong])
            boxes = torch.cat([target["boxes"].as_subclass(torch.Tensor)[:n], target["boxes"][:1] + 9])
            self.answers[round(float(image.sum()), 2)] = {
                "boxes": boxes.float(), "labels": torch.ones(n + 1, dtype=torch.int64),
                "scores": torch.tensor([0.9] * n + [0.7]), "masks": all_masks[:, None].float()}

    def forward(self, images, targets=None):
        return [dict(self.answers[round(float(image.sum()), 2)]) for image in images]


def _evaluate_shard(rank: int, world: int, init_file: str, root: str, out: str) -> None:
    """One process of a gloo group: evaluate this rank's shard; process 0 writes the record."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = ChromosomeDataset(root, "val", transforms=get_transform("none", train=False))
        loader = DataLoader(ds, batch_size=1, sampler=ShardSampler(len(ds), world, rank),
                            collate_fn=loop.collate_fn)
        record = loop.evaluate(ContentOracle(ds), loader, torch.device("cpu"), ds.coco, ds.label_to_cat_id,
                                 label_names=ds.label_names)
        Path(out, f"record_{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def test_distributed_evaluate_equals_one_process(tmp_path):
    """Two gloo processes, uneven shards (3 images): the gathered record equals a one-process evaluation."""
    import json

    import torch.multiprocessing as mp
    from conftest import make_tiny_coco

    make_tiny_coco(tmp_path, "val", 3, seed=5)
    ds = ChromosomeDataset(tmp_path, "val", transforms=get_transform("none", train=False))
    single = _evaluate(ContentOracle(ds), ds)
    assert 0.2 < single["segm"]["AP"] < 0.95 and single["num_detections"] == 12
    mp.spawn(_evaluate_shard, args=(2, str(tmp_path / "init"), str(tmp_path), str(tmp_path)), nprocs=2)
    for rank in range(2):  # every process returns the same record
        record = json.loads((tmp_path / f"record_{rank}.json").read_text())
        assert record == json.loads(json.dumps(single))
