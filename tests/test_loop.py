"""engine.loop: the training step (warmup, clipping, accumulation, AMP, loss weights, non-finite losses) on a
stand-in model."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from train_utils.data.loaders import collate_fn
from train_utils.engine import loop, schedule


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
    assert collate_fn([(1, "a"), (2, "b")]) == ((1, 2), ("a", "b"))
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
    return [collate_fn(samples[i:i + batch]) for i in range(0, count, batch)]


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
