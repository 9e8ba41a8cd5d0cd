"""train_utils/inference/openvino_modules.py: the backbone, RPN head and mask head run by OpenVINO inside
``inference.detect`` give PyTorch's detections, images without detections still run, the PyTorch modules come back,
and without openvino (or where a conversion fails) the model stays PyTorch with one line saying why. The tests that
convert are skipped when openvino is not installed; the fallbacks are tested everywhere."""
from __future__ import annotations

import sys

import pytest
import torch

from errors import UserError
from network_files import ModelConfig, build_model
from train_utils.inference import openvino_modules
from train_utils.inference.detect import Speedups, apply_speedups, detect, prepare_model
from train_utils.inference.openvino_modules import OpenVinoModule, converted_paths, use_openvino


def tiny_model(name: str) -> tuple[torch.nn.Module, ModelConfig]:
    torch.manual_seed(0)
    config = ModelConfig(name=name, backbone="resnet18", min_size=128, max_size=160, norm_layer="frozen_bn",
                         box_detections_per_img=8, overlap_cls_head="conv")
    model = build_model(config).eval()
    prepare_model(model, config, 0.0)
    return model, config


@pytest.fixture(scope="module", params=["maskrcnn", "dacseg"])
def converted(request) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny model with OpenVINO running its heavy modules, and the same model in PyTorch (converting is most of
    these tests' time)."""
    pytest.importorskip("openvino")
    model, _ = tiny_model(request.param)
    reference, _ = tiny_model(request.param)
    apply_speedups(model, Speedups(openvino=True))
    return model, reference


def test_openvino_modules_give_pytorchs_detections_at_any_image_size(converted):
    model, reference = converted
    assert model.speedups.openvino and all(isinstance(model.get_submodule(p), OpenVinoModule) for p in converted_paths(model))
    for size in ((128, 160), (100, 150)):
        image = torch.rand(3, *size, generator=torch.Generator().manual_seed(size[0]))
        expected, found = detect(reference, [image], None)[0], detect(model, [image], None)[0]
        assert len(found["scores"]) == len(expected["scores"]) == 8
        assert torch.allclose(found["scores"], expected["scores"], atol=1e-4)
        assert torch.allclose(found["boxes"], expected["boxes"], atol=0.05)
        assert torch.allclose(found["masks"].full(), expected["masks"].full(), atol=1e-2)
        if "overlap_scores" in expected:
            assert torch.allclose(found["overlap_scores"], expected["overlap_scores"], atol=1e-4)


def test_an_image_without_detections_runs_the_pytorch_mask_head(converted):
    model, _ = converted
    model.roi_heads.score_thresh = 1.0  # nothing scores above 1: the mask head gets no RoIs
    try:
        found = detect(model, [torch.rand(3, 128, 160)])[0]
    finally:
        model.roi_heads.score_thresh = 0.0
    assert len(found["scores"]) == 0 and found["masks"].full().shape == (0, 1, 128, 160)


def test_the_pytorch_modules_come_back_and_the_state_dict_is_the_models(converted):
    model, reference = converted
    keys = list(reference.state_dict())
    apply_speedups(model, Speedups())
    try:
        assert not model.speedups.openvino and list(model.state_dict()) == keys
        assert not any(isinstance(model.get_submodule(p), OpenVinoModule) for p in converted_paths(model))
        image = torch.rand(3, 128, 160)
        assert torch.equal(detect(model, [image])[0]["scores"], detect(reference, [image])[0]["scores"])
    finally:
        apply_speedups(model, Speedups(openvino=True))  # converted once: the second time costs nothing
    assert model.speedups.openvino


def test_without_openvino_the_model_stays_pytorch_and_one_line_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    model, _ = tiny_model("maskrcnn")
    lines: list[str] = []
    assert use_openvino(model, True, log=lines.append) is False
    assert lines == ["openvino is not installed (pip install openvino): running PyTorch"]
    assert type(model.backbone).__name__ == "BackboneWithFPN"


def test_a_failed_conversion_falls_back_to_pytorch_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", type(sys)("openvino"))  # importable, whatever is installed

    def fail(model, threads):
        raise RuntimeError("Cannot trace the model:\nunsupported operation aten::foo")

    monkeypatch.setattr(openvino_modules, "_converted", fail)
    model, _ = tiny_model("dacseg")
    apply_speedups(model, Speedups(openvino=True, channels_last=True))
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == ["OpenVINO could not convert the model (RuntimeError: Cannot trace the model: unsupported "
                       "operation aten::foo): running PyTorch"]
    assert model.speedups == Speedups(channels_last=True)  # says what runs
    assert len(detect(model, [torch.rand(3, 128, 160)])[0]["scores"]) == 8


def test_openvino_does_not_combine_with_bf16():
    model, _ = tiny_model("maskrcnn")
    with pytest.raises(UserError, match="--openvino runs float32; it does not combine with --bf16"):
        apply_speedups(model, Speedups(openvino=True, bf16=True))


def test_the_converted_modules_are_the_backbone_rpn_head_and_every_stack_of_roi_convolutions():
    assert converted_paths(tiny_model("maskrcnn")[0]) == ["backbone", "rpn.head", "roi_heads.mask_head"]
    assert converted_paths(tiny_model("dacseg")[0]) == [
        "backbone", "rpn.head", "roi_heads.mask_head", "roi_heads.overlap_head.overlap.conv_in",
        "roi_heads.overlap_head.overlap.convs", "roi_heads.overlap_head.overlap_else.conv_in",
        "roi_heads.overlap_head.overlap_else.convs"]
