"""ResNet-FPN backbones: stages frozen, norm layers, and backbone weights from a local file or a weights name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.ops import FrozenBatchNorm2d

from backbone import WeightsError, load_backbone_weights, resnet_fpn_backbone

TRAINABLE_STAGES = {
    0: set(),
    1: {"layer4"},
    3: {"layer2", "layer3", "layer4"},
    5: {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"},
}


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    """A plain torchvision ResNet-50 state dict (BatchNorm, with the fc classifier) with a few marked tensors."""
    torch.manual_seed(0)
    state = resnet50().state_dict()
    state["conv1.weight"].fill_(0.25)
    state["layer4.2.bn3.running_var"].fill_(7.0)
    return state


@pytest.mark.parametrize("trainable_layers", sorted(TRAINABLE_STAGES))
def test_trainable_layers_freeze_the_earlier_stages(trainable_layers):
    backbone = resnet_fpn_backbone("resnet50", "bn", trainable_layers)
    trainable = TRAINABLE_STAGES[trainable_layers]
    for name, param in backbone.body.named_parameters():
        assert param.requires_grad == (name.split(".")[0] in trainable), name
    assert all(p.requires_grad for p in backbone.fpn.parameters())


@pytest.mark.parametrize("norm_layer, present, absent", [
    ("bn", nn.BatchNorm2d, FrozenBatchNorm2d),
    ("frozen_bn", FrozenBatchNorm2d, nn.BatchNorm2d),
])
def test_norm_layer_choice(norm_layer, present, absent):
    body = resnet_fpn_backbone("resnet50", norm_layer, 3).body
    kinds = {type(m) for m in body.modules()}
    assert present in kinds and absent not in kinds


def test_deeper_backbones_have_their_shape():
    resnet101 = resnet_fpn_backbone("resnet101", "frozen_bn", 3)
    assert len(resnet101.body.layer3) == 23
    resnext = resnet_fpn_backbone("resnext101_32x8d", "frozen_bn", 3)
    assert resnext.body.layer1[0].conv2.groups == 32
    assert resnext.out_channels == resnet101.out_channels == 256


def test_small_backbones_feed_the_same_fpn():
    """resnet18/34 (basic blocks, 64..512 channels) give the FPN levels Mask R-CNN expects."""
    small = resnet_fpn_backbone("resnet18", "bn", 5)
    assert small.body.layer4[0].conv1.in_channels == 256 and small.out_channels == 256
    features = small(torch.zeros(1, 3, 64, 64))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[1:]) for f in features.values()] == [(256, 16, 16), (256, 8, 8), (256, 4, 4),
                                                               (256, 2, 2), (256, 1, 1)]
    assert len(resnet_fpn_backbone("resnet34", "frozen_bn", 3).body.layer3) == 6


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="resnet152"):
        resnet_fpn_backbone("resnet152", "bn", 3)


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
@pytest.mark.parametrize("norm_layer", ["bn", "frozen_bn"])
def test_backbone_weights_from_a_file(tmp_path, capsys, resnet_state, wrapper, norm_layer):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet_state if wrapper is None else {wrapper: resnet_state, "epoch": 3}, path)

    backbone = resnet_fpn_backbone("resnet50", norm_layer, 3, weights_path=path)

    assert torch.all(backbone.body.conv1.weight == 0.25)
    assert torch.all(backbone.body.layer4[2].bn3.running_var == 7.0)
    out = capsys.readouterr().out
    # everything but the fc classifier; frozen BN keeps no num_batches_tracked counters (53 fewer tensors)
    assert f"loaded {318 if norm_layer == 'bn' else 265} tensors from {path}" in out
    assert "missing 0 tensors" in out and "unexpected 0 tensors" in out
    assert not backbone.body.conv1.weight.requires_grad and backbone.body.layer4[0].conv1.weight.requires_grad


def test_load_report_names_missing_and_unexpected_keys(tmp_path, resnet_state):
    state = dict(resnet_state)
    del state["layer4.2.conv3.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)

    report = load_backbone_weights(resnet50(), path)

    assert report.missing == ["layer4.2.conv3.weight"] and report.unexpected == ["extra.weight"]
    lines = report.lines()
    assert len(lines) == 3 and lines == str(report).splitlines()
    assert lines[0].startswith(f"loaded 317 tensors from {path}")
    assert lines[1] == "missing 1 tensor: layer4.2.conv3.weight"
    assert lines[2] == "unexpected 1 tensor: extra.weight"


def test_backbone_weights_from_a_torchvision_name(monkeypatch, capsys, resnet_state):
    """The weights-name path, with the download replaced by the state dict (tests never touch the network)."""
    monkeypatch.setattr(ResNet50_Weights, "get_state_dict", lambda self, **kwargs: resnet_state)
    backbone = resnet_fpn_backbone("resnet50", "frozen_bn", 3, weights_path="ResNet50_Weights.IMAGENET1K_V1")
    assert torch.all(backbone.body.conv1.weight == 0.25)
    assert "loaded 265 tensors from ResNet50_Weights.IMAGENET1K_V1" in capsys.readouterr().out


def _write_garbage(path):
    path.write_text("not a checkpoint")


def _write_list(path):
    torch.save([1, 2, 3], path)


def _write_module(path):
    torch.save(nn.Linear(2, 2), path)


def _write_empty(path):
    path.write_bytes(b"")


class _Payload:
    """A pickle that would run a command when loaded without weights_only."""

    def __reduce__(self):
        import os

        return os.system, ("touch /tmp/dacseg_pickle_payload_ran",)


def _write_payload(path):
    torch.save({"model": _Payload()}, path)


def _write_notes(path):
    path.write_text("notes about the run\nlr 0.02\n")


@pytest.mark.parametrize("write, expected", [
    (None, "not found"),
    (_write_garbage, "not a PyTorch weights file"),
    (_write_list, "is not a state dict"),
    (_write_module, "must not contain"),
    (_write_empty, "empty or truncated"),
    (_write_payload, "holds code or objects that a weights file must not contain (Trying to load unsupported "
                     "GLOBAL posix.system); it was not loaded"),
    (_write_notes, "not a PyTorch weights file"),
])
def test_bad_weights_file_gives_one_line_naming_it(tmp_path, write, expected):
    path = tmp_path / "bad.pth"
    if write is not None:
        write(path)
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(resnet50(), path)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message
    assert "weights_only" not in message  # never torch's advice to load unsafely
    assert not Path("/tmp/dacseg_pickle_payload_ran").exists()


def test_unknown_weights_name_and_folder_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="ResNet50_Weights.NOPE"):
        load_backbone_weights(resnet50(), "ResNet50_Weights.NOPE")
    with pytest.raises(WeightsError, match="is not a file"):
        load_backbone_weights(resnet50(), tmp_path)


def test_weights_of_another_architecture_are_refused(tmp_path, resnet_state):
    wrong_shape = dict(resnet_state, **{"layer1.0.conv2.weight": torch.zeros(64, 2, 3, 3)})
    torch.save(wrong_shape, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv2\.weight has shape \[64, 2, 3, 3\]"):
        load_backbone_weights(resnet50(), tmp_path / "wrong.pth")
    torch.save({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "detector.pth")
    with pytest.raises(WeightsError, match="no tensor fits a resnet50 backbone"):
        load_backbone_weights(resnet50(), tmp_path / "detector.pth", "resnet50")
