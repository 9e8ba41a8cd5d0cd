"""Checkpoints: atomic saving, safe loading, rebuilding a model from the checkpoint alone, RNG state, pruning."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from network_files import ModelConfig, build_model
from train_utils.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    config_from_checkpoint,
    load_checkpoint,
    load_model_from_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)

TINY = ModelConfig(min_size=128, max_size=160, trainable_layers=0, norm_layer="frozen_bn")


def test_model_round_trips_through_a_checkpoint(tmp_path):
    model = build_model(TINY)
    path = tmp_path / "model_0.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": TINY.to_dict(), "epoch": 0}, path)
    rebuilt, config, checkpoint = load_model_from_checkpoint(path)
    assert config == TINY and checkpoint["epoch"] == 0 and not rebuilt.training
    for key, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], tensor), key


def test_saving_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model_0.pth"
    save_checkpoint({"epoch": 0}, path)

    def dies_while_writing(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 1}, path)
    assert load_checkpoint(path)["epoch"] == 0  # the previous checkpoint is intact


class Gadget:  # a pickled object: weights_only loading must refuse to run its code
    pass


@pytest.mark.parametrize("content, expected", [
    (None, "checkpoint not found"),
    (b"not a checkpoint", "cannot read checkpoint"),
    ("pickled", "cannot read checkpoint"),
    ([1, 2], "is not a DaCSeg checkpoint"),
])
def test_bad_checkpoints_give_one_line_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "x.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "pickled":
        torch.save({"model": Gadget()}, path)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message
    assert "weights_only=False" not in message  # never advise loading a stranger's file unsafely


def test_a_checkpoint_without_model_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no model config"):
        config_from_checkpoint({"model": {}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="bad model config"):
        config_from_checkpoint({"model": {}, "model_config": {"name": "yolo"}}, "ckpt.pth")


def test_weights_that_do_not_fit_are_named(tmp_path):
    path = tmp_path / "w.pth"
    save_checkpoint({"model": {"nope": torch.zeros(1)}, "model_config": TINY.to_dict()}, path)
    with pytest.raises(CheckpointError, match="do not fit a maskrcnn model"):
        load_model_from_checkpoint(path)


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint({"rng_state": state}, tmp_path / "rng.pth")
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng_state"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_prune_keeps_the_newest_and_best(tmp_path):
    for epoch in (0, 1, 2, 10):
        (tmp_path / f"model_{epoch}.pth").write_bytes(b"x")
    (tmp_path / "best.pth").write_bytes(b"x")
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["model_0.pth", "model_1.pth"]
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "model_10.pth", "model_2.pth"]
    assert prune_checkpoints(tmp_path, keep_last=0) == []
