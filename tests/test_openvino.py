"""OpenVINO backend (train_utils/inference/exported.py, tools/export.py --format openvino): the exported graph
compiled in exact float32 gives PyTorch's detections, predict.py runs a .xml model, and what goes wrong is one line.
Skipped when onnx, onnxruntime or openvino are not installed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from errors import UserError
from my_dataset_chromosome import DatasetError
from tests.test_export import make_checkpoint
from tools import export
from train_utils.engine.checkpoint import load_model_from_checkpoint
from train_utils.inference.detect import detect, prepare_model
from train_utils.inference.exported import OnnxDetector, OpenVinoDetector, OrtOptions, load_exported_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, OpenVinoDetector]:
    """A tiny Mask R-CNN checkpoint, its OpenVINO IR (converted from its ONNX graph, metadata included) and the IR
    compiled for any image size (compiling is most of these tests' time)."""
    folder = tmp_path_factory.mktemp("openvino")
    checkpoint = make_checkpoint(folder / "m.pth", "maskrcnn")
    model, config, info = load_model_from_checkpoint(checkpoint, "cpu")
    image = torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(0))
    export.export_onnx(model, config, info, image, folder / "m.onnx")
    export.export_openvino(folder / "m.onnx", folder / "m.xml")
    return checkpoint, folder / "m.xml", OpenVinoDetector(folder / "m.xml", threads=1)


def test_openvino_and_onnxruntime_find_pytorchs_detections(exported, tiny_coco):
    checkpoint, ir, dynamic = exported
    model, config, _ = load_model_from_checkpoint(checkpoint, "cpu")
    image = torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(1))
    detectors = [model, dynamic, OpenVinoDetector(ir, threads=1, static_shapes=True),
                 OnnxDetector(ir.with_suffix(".onnx"), threads=1, options=OrtOptions(spinning=False, arena=False))]
    outputs = []
    for detector in detectors:
        prepare_model(detector, config, 0.0)
        outputs.append(detect(detector, [image], mask_thresh=None)[0])
    reference = outputs[0]
    assert len(reference["scores"]) == 8
    for output in outputs[1:]:
        assert torch.allclose(output["boxes"], reference["boxes"], atol=0.05)
        assert torch.allclose(output["scores"], reference["scores"], atol=1e-4)
        assert torch.allclose(output["masks"].full(), reference["masks"].full(), atol=1e-2)
    assert detectors[1].compiled.keys() == {None} and detectors[2].compiled.keys() == {(3, 128, 160)}


def test_predict_runs_an_openvino_model(exported, tiny_coco, tmp_path):
    import predict

    _, ir, _ = exported
    image = tiny_coco / "images" / "val_001.png"
    assert predict.main(["--weights-path", str(ir), str(image), "--output-dir", str(tmp_path / "p"),
                         "--score-thresh", "0", "--threads", "1"]) == 0
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(results) == 8 and {r["category_id"] for r in results} == {5}


def test_openvino_problems_are_one_line(exported, tmp_path, capsys):
    _, ir, detector = exported
    with pytest.raises(UserError, match="OpenVINO model not found"):
        load_exported_model(tmp_path / "none.xml")
    (tmp_path / "bad.xml").write_text("<net>")
    with pytest.raises(UserError, match=r"^cannot load OpenVINO model .*bad\.xml: "):
        load_exported_model(tmp_path / "bad.xml")
    with pytest.raises(UserError, match="was not exported by tools/export.py"):
        OpenVinoDetector(_plain_onnx(tmp_path))
    with pytest.raises(DatasetError, match=r"^openvino failed on a 160x128 image: "):
        detector([torch.rand(1, 3, 128, 160)])  # a batch where one image belongs
    assert export.main(["--weights-path", "x.pth", "--format", "openvino", "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip().endswith("name an OpenVINO model *.xml (predict.py recognises exported "
                                                    "models by it)")


def _plain_onnx(folder: Path) -> Path:
    """A valid ONNX graph (one Relu) without tools/export.py's metadata."""
    from onnx import TensorProto, helper, save

    tensor = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain",
                              [tensor("x", TensorProto.FLOAT, [1, 3])], [tensor("y", TensorProto.FLOAT, [1, 3])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "plain.onnx"))
    return folder / "plain.onnx"
