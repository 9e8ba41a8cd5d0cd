"""train_utils/inference/openvino_modules.py: the backbone, RPN head and mask head run by OpenVINO inside
``inference.detect`` give PyTorch's detections, images without detections still run, the PyTorch modules come back,
and without openvino (or where a conversion fails) the model stays PyTorch with one line saying why. The tests that
convert are skipped when openvino is not installed; the fallbacks are tested everywhere."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

from errors import UserError
from network_files import ModelConfig, build_model
from train_utils.inference import openvino_modules
from train_utils.inference.detect import Speedups, apply_speedups, detect, prepare_model
from train_utils.inference.openvino_modules import converted_paths, use_openvino


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


class Recording:
    """A compiled graph that counts its calls."""

    def __init__(self, compiled):
        self.compiled, self.outputs, self.calls = compiled, compiled.outputs, 0

    def __call__(self, arrays):
        self.calls += 1
        return self.compiled(arrays)


def test_openvino_modules_give_pytorchs_detections_at_any_image_size(converted):
    model, reference = converted
    graphs = openvino_modules._CONVERTED[model].graphs
    assert model.speedups.openvino and list(graphs) == converted_paths(model)
    spies = {path: Recording(graph.compiled) for path, graph in graphs.items()}
    for path, spy in spies.items():
        graphs[path].compiled = spy
    try:
        for size in ((128, 160), (100, 150)):
            image = torch.rand(3, *size, generator=torch.Generator().manual_seed(size[0]))
            expected, found = detect(reference, [image], None)[0], detect(model, [image], None)[0]
            assert len(found["scores"]) == len(expected["scores"]) == 8
            assert torch.allclose(found["scores"], expected["scores"], atol=1e-4)
            assert torch.allclose(found["boxes"], expected["boxes"], atol=0.05)
            assert torch.allclose(found["masks"].full(), expected["masks"].full(), atol=1e-2)
            if "overlap_scores" in expected:
                assert torch.allclose(found["overlap_scores"], expected["overlap_scores"], atol=1e-4)
    finally:
        for path, spy in spies.items():
            graphs[path].compiled = spy.compiled
    assert {path: spy.calls for path, spy in spies.items()} == {path: 2 for path in spies}  # OpenVINO ran each


def test_an_image_without_detections_runs_the_pytorch_mask_head(converted):
    model, _ = converted
    graphs = openvino_modules._CONVERTED[model].graphs
    backbone, mask_head = Recording(graphs["backbone"].compiled), Recording(graphs["roi_heads.mask_head"].compiled)
    graphs["backbone"].compiled, graphs["roi_heads.mask_head"].compiled = backbone, mask_head
    model.roi_heads.score_thresh = 1.0  # nothing scores above 1: the mask head gets no RoIs
    try:
        found = detect(model, [torch.rand(3, 128, 160)])[0]
    finally:
        model.roi_heads.score_thresh = 0.0
        graphs["backbone"].compiled, graphs["roi_heads.mask_head"].compiled = backbone.compiled, mask_head.compiled
    assert len(found["scores"]) == 0 and found["masks"].full().shape == (0, 1, 128, 160)
    assert (backbone.calls, mask_head.calls) == (1, 0)  # the empty RoI batch went to PyTorch's mask head


def test_the_model_itself_stays_pytorch_while_openvino_runs(converted):
    model, reference = converted
    assert list(model.state_dict()) == list(reference.state_dict())
    assert not any("forward" in model.get_submodule(path).__dict__ for path in converted_paths(model))
    copy.deepcopy(model)  # nothing unpicklable hangs on the model
    compiled_forward = model.backbone.forward  # what torch.compile's wrapper keeps on its instance
    model.backbone.forward = compiled_forward
    try:
        detect(model, [torch.rand(3, 128, 160)])
        assert model.backbone.__dict__["forward"] is compiled_forward  # put back, not deleted
    finally:
        del model.backbone.forward
    apply_speedups(model, Speedups())
    try:
        image = torch.rand(3, 128, 160)
        assert not model.speedups.openvino
        assert torch.equal(detect(model, [image])[0]["scores"], detect(reference, [image])[0]["scores"])
    finally:
        apply_speedups(model, Speedups(openvino=True))  # converted once: the second time costs nothing
    assert model.speedups.openvino


def test_the_conversion_check_refuses_a_graph_that_differs_from_pytorch():
    openvino = pytest.importorskip("openvino")
    conv = torch.nn.Conv2d(3, 4, 3).eval()
    example = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        expected = conv(example)
    compiled = openvino_modules._compile(openvino.Core(), conv, (example,), 1, [expected], "conv")
    assert [output.get_partial_shape().rank.get_length() for output in compiled.outputs] == [4]
    with pytest.raises(RuntimeError, match="the converted conv differs from PyTorch by 1"):
        openvino_modules._compile(openvino.Core(), conv, (example,), 1, [expected + 1], "conv")


def test_without_openvino_the_model_stays_pytorch_and_one_line_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    model, _ = tiny_model("maskrcnn")
    lines: list[str] = []
    assert use_openvino(model, log=lines.append) is False
    assert lines == ["openvino is not installed (pip install openvino): running PyTorch"]


@pytest.fixture
def fake_convert(monkeypatch) -> list[str]:
    """openvino importable, and ``_convert`` recording each model it is asked for; it converts nothing (an empty
    graph set), or raises RuntimeError once ``outcome[0]`` says "fail"."""
    monkeypatch.setitem(sys.modules, "openvino", type(sys)("openvino"))
    calls: list[str] = []

    def convert(model, threads):
        calls.append(type(model).__name__)
        if calls[0] == "fail":
            raise RuntimeError("Cannot trace the model:\nunsupported operation aten::foo")
        return {}

    monkeypatch.setattr(openvino_modules, "_convert", convert)
    return calls


def test_a_failed_conversion_falls_back_to_pytorch_in_one_line_and_is_not_retried(fake_convert, capsys):
    fake_convert.append("fail")
    model, _ = tiny_model("dacseg")
    for _ in range(2):
        apply_speedups(model, Speedups(openvino=True, channels_last=True))
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == 2 * ["OpenVINO could not convert the model (RuntimeError: Cannot trace the model: unsupported "
                           "operation aten::foo): running PyTorch"]
    assert fake_convert == ["fail", "MaskRCNN"]  # converted once
    assert model.speedups == Speedups(channels_last=True)  # says what runs
    assert len(detect(model, [torch.rand(3, 128, 160)])[0]["scores"]) == 8


def test_openvino_drops_channels_last_and_converts_again_when_the_weights_change(fake_convert, capsys):
    model, _ = tiny_model("maskrcnn")
    apply_speedups(model, Speedups(openvino=True, channels_last=True))
    assert model.speedups == Speedups(openvino=True)  # the graphs take NCHW arrays
    detect(model, [torch.rand(3, 128, 160)])
    assert fake_convert == ["MaskRCNN"]  # the graphs are kept
    with torch.no_grad():
        model.rpn.head.conv[0][0].weight.mul_(2)
    detect(model, [torch.rand(3, 128, 160)])
    assert fake_convert == ["MaskRCNN", "MaskRCNN"]  # stale graphs are converted again
    assert "converted in" in capsys.readouterr().out


def test_openvino_needs_an_eval_model():
    model, _ = tiny_model("maskrcnn")
    with pytest.raises(ValueError, match="OpenVINO runs a model in eval mode"):
        apply_speedups(model.train(), Speedups(openvino=True))


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
