"""The model builder: same structure as stock torchvision, config fields reach the model, detector weights load."""
from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d

from network_files import (
    LoadReport,
    ModelConfig,
    WeightsError,
    build_model,
    load_detector_weights,
    resolve_config,
)
from network_files.builder import is_class_specific

TINY = {"min_size": 128, "max_size": 160}
MASKRCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def scratch_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY))


@pytest.fixture(scope="module")
def coco_like_state(scratch_model) -> dict[str, torch.Tensor]:
    """A Mask R-CNN state dict for 91 classes (as the COCO checkpoint), with a marked backbone tensor."""
    state = {key: tensor.clone() for key, tensor in scratch_model.state_dict().items()}
    for key in list(state):
        if is_class_specific(key):
            shape = list(state[key].shape)
            shape[0] = 91 * 4 if "bbox_pred" in key else 91
            state[key] = torch.full(shape, 0.5)
    state["backbone.body.conv1.weight"].fill_(0.25)
    return state


def test_scratch_model_matches_stock_torchvision(scratch_model):
    stock = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, **TINY)
    assert shapes(scratch_model) == shapes(stock)
    assert [type(m) for m in scratch_model.modules()] == [type(m) for m in stock.modules()]
    assert {n: p.requires_grad for n, p in scratch_model.named_parameters()} == {
        n: p.requires_grad for n, p in stock.named_parameters()
    }
    assert scratch_model.rpn.anchor_generator.sizes == stock.rpn.anchor_generator.sizes
    assert scratch_model.rpn.anchor_generator.aspect_ratios == stock.rpn.anchor_generator.aspect_ratios
    assert (scratch_model.transform.min_size, scratch_model.transform.max_size) == ((128,), 160)


def test_resolve_config_follows_torchvision_rule():
    auto = ModelConfig(**TINY)
    assert (resolve_config(auto, pretrained=True).trainable_layers, resolve_config(auto, True).norm_layer) == (
        3, "frozen_bn")
    assert (resolve_config(auto, pretrained=False).trainable_layers, resolve_config(auto, False).norm_layer) == (
        5, "bn")
    explicit = ModelConfig(trainable_layers=0, norm_layer="bn", **TINY)
    assert resolve_config(explicit, pretrained=True) == explicit
    assert auto.trainable_layers is None and auto.norm_layer is None  # the input is left as it was


def test_config_fields_reach_the_model():
    config = ModelConfig(
        num_classes=3, trainable_layers=2, norm_layer="frozen_bn", anchor_sizes=(16, 32, 64, 128, 256),
        box_score_thresh=0.3, box_nms_thresh=0.4, box_detections_per_img=7, **TINY,
    )
    model = build_model(config)
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert model.rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    heads = model.roi_heads
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.3, 0.4, 7)
    assert heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    trainable = {name.split(".")[0] for name, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


def test_pretrained_backbone_resolves_to_frozen_bn_and_three_stages(tmp_path, capsys):
    torch.manual_seed(0)
    state = resnet50().state_dict()
    state["conv1.weight"].fill_(0.25)
    torch.save({"model": state}, tmp_path / "resnet50.pth")

    model = build_model(ModelConfig(**TINY), pretrained_backbone=str(tmp_path / "resnet50.pth"))

    body = model.backbone.body
    assert torch.all(body.conv1.weight == 0.25)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    assert "missing 0 tensors" in capsys.readouterr().out


def test_other_class_count_drops_the_predictors_and_says_so(tmp_path, coco_like_state):
    path = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save({"model": coco_like_state, "epoch": 25}, path)
    model = build_model(ModelConfig(trainable_layers=3, norm_layer="frozen_bn", **TINY))
    predictor_before = model.roi_heads.box_predictor.cls_score.weight.clone()

    report = load_detector_weights(model, path)

    assert isinstance(report, LoadReport)
    assert sorted(report.dropped) == sorted(k for k in coco_like_state if is_class_specific(k))
    assert len(report.dropped) == 6 and report.missing == [] and report.unexpected == []
    assert torch.all(model.backbone.body.conv1.weight == 0.25)
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, predictor_before)
    lines = report.lines()
    assert len(lines) == 4
    # a frozen-BN model has no num_batches_tracked counters: it takes everything it has but the 6 predictors
    assert lines[0].startswith(f"loaded {len(model.state_dict()) - 6} tensors from {path}")
    assert lines[1].startswith("dropped 6 tensors (class-specific predictors: 91 classes in the source, 2 in the model")
    assert "roi_heads.box_predictor.cls_score.* (2)" in lines[1]
    assert lines[2:] == ["missing 0 tensors", "unexpected 0 tensors"]


def test_same_class_count_loads_everything(tmp_path, scratch_model):
    torch.save(scratch_model.state_dict(), tmp_path / "same.pth")
    model = build_model(ModelConfig(**TINY))
    report = load_detector_weights(model, tmp_path / "same.pth")
    assert report.dropped == [] and report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(scratch_model.state_dict())
    assert torch.equal(model.roi_heads.mask_predictor.mask_fcn_logits.weight,
                       scratch_model.roi_heads.mask_predictor.mask_fcn_logits.weight)


def test_new_heads_are_reported_as_starting_fresh(tmp_path, coco_like_state):
    """What a DaCSeg model sees when given COCO Mask R-CNN weights: its extra heads are named as new."""
    torch.save(coco_like_state, tmp_path / "coco.pth")
    model = build_model(ModelConfig(**TINY))
    model.roi_heads.overlap_head = nn.Sequential(nn.Conv2d(256, 8, 3), nn.Conv2d(8, 2, 1))

    report = load_detector_weights(model, tmp_path / "coco.pth")

    assert report.new_modules == ["roi_heads.overlap_head"]
    assert sorted(report.missing) == sorted(k for k in model.state_dict() if k.startswith("roi_heads.overlap_head."))
    assert "missing 4 tensors: new modules, start fresh: roi_heads.overlap_head.* (4)" in report.lines()


def test_dacseg_name_converts_the_model(monkeypatch):
    calls = []

    def convert_to_dacseg(model, config, load_codebook=True):
        calls.append(config.name)
        model.converted = True
        return model

    monkeypatch.setattr("network_files.builder.convert_to_dacseg", convert_to_dacseg)
    model = build_model(ModelConfig(name="dacseg", **TINY))
    assert calls == ["dacseg"] and model.converted


def test_coco_weights_into_real_dacseg_heads(tmp_path, coco_like_state):
    torch.save(coco_like_state, tmp_path / "coco.pth")
    model = build_model(ModelConfig(name="dacseg", overlap_cls_head="conv", trainable_layers=3, **TINY))

    report = load_detector_weights(model, tmp_path / "coco.pth")

    assert report.new_modules and report.unexpected == []
    assert all(key.startswith(tuple(p + "." for p in report.new_modules)) for key in report.missing)
    assert "new modules, start fresh" in report.lines()[2]

    # a DaCSeg checkpoint for another class count: its overlap predictors are class-specific too
    torch.save(model.state_dict(), tmp_path / "dacseg.pth")
    three_classes = build_model(ModelConfig(name="dacseg", overlap_cls_head="conv", num_classes=3, **TINY))
    report = load_detector_weights(three_classes, tmp_path / "dacseg.pth")
    assert len(report.dropped) > 6 and all(k.split(".")[-2] == "mask_fcn_logits" for k in report.dropped[6:])
    assert report.missing == [] and report.unexpected == []


def test_detector_weights_from_a_torchvision_name(monkeypatch, coco_like_state):
    monkeypatch.setattr(MaskRCNN_ResNet50_FPN_Weights, "get_state_dict", lambda self, **kwargs: coco_like_state)
    model = build_model(ModelConfig(**TINY))
    report = load_detector_weights(model, "MaskRCNN_ResNet50_FPN_Weights.COCO_V1")
    assert len(report.dropped) == 6 and torch.all(model.backbone.body.conv1.weight == 0.25)


@pytest.mark.parametrize("content, expected", [
    (None, "weights file not found"),
    (b"garbage bytes", "cannot read weights file"),
    ({"optimizer": {"lr": 0.1}}, "is not a state dict"),
    ({"conv1.weight": torch.zeros(64, 3, 7, 7)}, "no tensor fits a Mask R-CNN model"),
])
def test_unusable_detector_weights_give_one_line_naming_the_file(tmp_path, scratch_model, content, expected):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(WeightsError) as info:
        load_detector_weights(scratch_model, path)
    assert expected in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_shape_mismatch_outside_the_predictors_is_an_error(tmp_path, coco_like_state):
    assert is_class_specific("roi_heads.box_predictor.bbox_pred.bias")
    assert not is_class_specific("rpn.head.bbox_pred.bias")  # depends on the anchors, not the classes
    state = dict(coco_like_state, **{"rpn.head.conv.0.0.weight": torch.zeros(256, 256, 1, 1)})
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match=r"rpn\.head\.conv\.0\.0\.weight has shape \[256, 256, 1, 1\]"):
        load_detector_weights(build_model(ModelConfig(**TINY)), tmp_path / "odd.pth")


def test_forward_train_losses_and_eval_outputs(scratch_model):
    torch.manual_seed(0)
    image = torch.rand(3, 128, 160)
    masks = torch.zeros(2, 128, 160, dtype=torch.uint8)
    masks[0, 20:60, 30:50] = 1
    masks[1, 70:110, 90:140] = 1
    target = {
        "boxes": torch.tensor([[30.0, 20.0, 50.0, 60.0], [90.0, 70.0, 140.0, 110.0]]),
        "labels": torch.tensor([1, 1]),
        "masks": masks,
    }
    scratch_model.train()
    losses = scratch_model([image], [target])
    assert set(losses) == MASKRCNN_LOSSES and all(torch.isfinite(v) for v in losses.values())

    scratch_model.eval()
    scratch_model.roi_heads.score_thresh = 0.0  # an untrained model scores low: keep every detection
    with torch.no_grad():
        (output,) = scratch_model([image])
    scratch_model.roi_heads.score_thresh = 0.05
    assert set(output) == {"boxes", "labels", "scores", "masks"}
    n = len(output["boxes"])
    assert n > 0
    assert output["masks"].shape == (n, 1, 128, 160)
    assert output["labels"].shape == output["scores"].shape == (n,)


def test_config_round_trip_rebuilds_the_same_model():
    config = resolve_config(ModelConfig(num_classes=3, anchor_sizes=(16, 32, 64, 128, 256), **TINY), pretrained=True)
    restored = ModelConfig.from_dict(config.to_dict())
    assert restored == config
    first, second = build_model(config), build_model(restored)
    assert shapes(first) == shapes(second)
    assert {n for n, p in first.named_parameters() if p.requires_grad} == {
        n for n, p in second.named_parameters() if p.requires_grad
    }
    second.load_state_dict(first.state_dict())  # strict: a checkpoint of one loads into the other


def test_config_is_decided_once_then_read():
    config = ModelConfig(anchor_sizes=[16.0, 32, 64, 128, 256], **TINY)
    assert config.anchor_sizes == (16, 32, 64, 128, 256)  # normalised once, at construction
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.min_size = 256
    changed = dataclasses.replace(config, min_size=144)
    assert (changed.min_size, config.min_size) == (144, 128)
    with pytest.raises(ValueError, match="min_size"):
        dataclasses.replace(config, min_size=16)  # a changed copy is validated too


def test_loss_weights_are_read_only_and_copied_from_the_caller():
    weights = {"loss_mask": 2.0}
    config = ModelConfig(loss_weights=weights, **TINY)
    weights["loss_mask"] = 5.0  # the caller's dict is not the config's
    with pytest.raises(TypeError):
        config.loss_weights["loss_mask"] = 3.0
    with pytest.raises(TypeError):
        config.loss_weights.update(loss_mask=3.0)
    assert config.loss_weights == {"loss_mask": 2.0}
    assert copy.deepcopy(config) == config == pickle.loads(pickle.dumps(config))
    stored = config.to_dict()
    assert type(stored["loss_weights"]) is dict and ModelConfig.from_dict(stored) == config


def test_loss_weights_live_in_the_config_and_the_model_returns_raw_terms(scratch_model):
    """The weights are applied by the training step (train_utils.engine.loop): a model never hides them in a hook."""
    image = torch.rand(3, 128, 160)
    target = {"boxes": torch.tensor([[20.0, 30.0, 90.0, 70.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 128, 160, dtype=torch.uint8)}
    target["masks"][0, 30:70, 20:90] = 1
    weighted = build_model(ModelConfig(**TINY, loss_weights={"loss_mask": 0.0, "loss_objectness": 3.0}))
    weighted.load_state_dict(scratch_model.state_dict())
    assert not weighted._forward_hooks and not hasattr(weighted, "loss_weights")
    scratch_model.train(), weighted.train()
    torch.manual_seed(1)
    plain = scratch_model([image], [target])
    torch.manual_seed(1)
    raw = weighted([image], [target])
    assert raw.keys() == plain.keys() and all(torch.allclose(raw[k], plain[k]) for k in plain)


def test_dacseg_loss_weights_are_refused_for_mask_rcnn():
    with pytest.raises(ValueError, match="loss_overlap.*--model dacseg"):
        ModelConfig(loss_weights={"loss_overlap": 2.0})
