"""tools/export.py: both models to ONNX with a dynamic image size, checked against PyTorch, and run by predict.py;
what cannot be exported is one line. Skipped when onnx / onnxruntime are not installed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_convert

from network_files import ModelConfig, build_model
from tests.test_shape_prior import write_codebook
from tools import export
from train_utils.engine.checkpoint import save_checkpoint

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def make_checkpoint(path: Path, name: str) -> Path:
    """``name`` is a model name, or ``dacseg_shape``: DaCSeg with a shape prior (its codebook beside ``path``).
    A strict NMS and a high detection limit leave a number of detections that depends on the image, as a trained
    model's does: an exported graph must not keep the count of the image it was traced on."""
    prior = {}
    if name == "dacseg_shape":
        name, prior = "dacseg", {"shape_prior": str(write_codebook(path.with_suffix(".codebook.pt")))}
    torch.manual_seed(0)
    config = ModelConfig(name=name, backbone="resnet18", min_size=128, max_size=160, trainable_layers=0,
                         norm_layer="frozen_bn", box_detections_per_img=100, box_nms_thresh=0.05,
                         overlap_cls_head="conv", **prior)
    save_checkpoint({"model": build_model(config).state_dict(), "model_config": config.to_dict(), "epoch": 3,
                     "label_names": {1: "chromosome"}, "label_to_cat_id": {1: 5},
                     "stain": {"polarity": "bright-on-dark", "train_counts": None}}, path)
    return path


@pytest.mark.parametrize("name", ["maskrcnn", "dacseg", "dacseg_shape"])
def test_onnx_export_round_trips_and_predict_runs_it(name, tiny_coco, tmp_path, capsys):
    import predict
    from train_utils.inference.exported import load_onnx_model

    checkpoint = make_checkpoint(tmp_path / f"{name}.pth", name)
    onnx_file = tmp_path / f"{name}.onnx"
    image = tiny_coco / "images" / "val_001.png"
    assert export.main(["--weights-path", str(checkpoint), "--out", str(onnx_file), "--check-image", str(image)]) == 0
    printed = capsys.readouterr().out
    counts = [int(n) for n in re.findall(r"^checked on (?:the check image|640x448): (\d+) detections", printed, re.M)]
    # traced on the check image, run on another with another count: the graph holds no detection count
    assert len(counts) == 2 and counts[0] != counts[1] and min(counts) > 0, printed
    _, config, info = load_onnx_model(onnx_file)
    assert config.name == name.removesuffix("_shape")
    assert info["label_to_cat_id"] == {"1": 5} and info["stain"]["polarity"] == "bright-on-dark"

    outputs = {}
    for weights in (checkpoint, onnx_file):
        out = tmp_path / f"pred_{weights.suffix[1:]}"
        assert predict.main(["--weights-path", str(weights), str(image), "--output-dir", str(out), "--device", "cpu",
                             "--score-thresh", "0"]) == 0
        outputs[weights.suffix] = json.loads((out / "predictions.json").read_text())
    exported, reference = outputs[".onnx"], outputs[".pth"]
    assert len(exported) == len(reference) == counts[0] and {r["category_id"] for r in exported} == {5}
    assert all(("overlap_score" in r) == name.startswith("dacseg") for r in exported + reference)
    differences = export.compare(predicted(reference), predicted(exported))  # matched by box: near-tied scores swap
    assert differences["unmatched"] == 0 and differences["boxes"] < 0.05 and differences["scores"] < 1e-3, differences


def predicted(records: list[dict]) -> dict[str, torch.Tensor]:
    """predictions.json's records of one image as the boxes, scores and labels that ``export.compare`` matches."""
    boxes = torch.tensor([r["bbox"] for r in records], dtype=torch.float32).reshape(-1, 4)
    return {"boxes": box_convert(boxes, "xywh", "xyxy"),
            "scores": torch.tensor([r["score"] for r in records]),
            "labels": torch.tensor([r["category_id"] for r in records], dtype=torch.int64)}


def test_what_cannot_be_exported_is_one_line(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "m.pth", "maskrcnn")
    # torch <= 2.14 with torchvision <= 0.29 (requirements.txt) cannot capture torchvision's detection post-processing
    code = export.main(["--weights-path", str(checkpoint), "--format", "torch-export", "--out", str(tmp_path / "m.pt2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: torch.export cannot capture the maskrcnn"), err
    assert "data-dependent" in err[0] and not list(tmp_path.glob("m.pt2*"))  # nothing unchecked left behind
    assert export.main(["--weights-path", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'none.pth'}"]


def test_predict_refuses_overlap_maps_from_an_exported_model(tiny_coco, tmp_path, capsys):
    import predict

    onnx_file = tmp_path / "d.onnx"
    assert export.main(["--weights-path", str(make_checkpoint(tmp_path / "d.pth", "dacseg")), "--out",
                        str(onnx_file)]) == 0
    capsys.readouterr()
    for flag in ("--save-overlap-maps", "--bf16", "--no-upscale", "--openvino"):  # runs as it was exported
        assert predict.main(["--weights-path", str(onnx_file), str(tiny_coco / "images" / "val_001.png"),
                             "--output-dir", str(tmp_path / "p"), flag]) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: {flag}: ")
    assert not (tmp_path / "p").exists()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def test_a_bad_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """--out a folder, an ONNX model not named .onnx, a folder that is a file, a missing --check-image: one line,
    before the checkpoint is even loaded (the export and its check take half a minute on a real model)."""
    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(export, "load_model_from_checkpoint", no_work)
    (tmp_path / "models").mkdir()
    (tmp_path / "file").write_text("x")
    for out, fmt, says in ((tmp_path / "models", "onnx", f"--out {tmp_path / 'models'} is a folder; name the file "
                                                       f"to write, e.g. {tmp_path / 'models' / 'model.onnx'}"),
                           (tmp_path / "models", "torch-export", "e.g. " + str(tmp_path / "models" / "model.pt2")),
                           (tmp_path / "m.bin", "onnx", "name an ONNX model *.onnx"),
                           (tmp_path / "file" / "m.onnx", "onnx", f"folder {tmp_path / 'file'} is a file, not a "
                                                                  "folder")):
        assert export.main(["--weights-path", "m.pth", "--format", fmt, "--out", str(out)]) == 2
        assert says in _one_line_error(capsys)
    assert export.main(["--weights-path", "m.pth", "--out", str(tmp_path / "m.onnx"), "--check-image",
                        str(tmp_path / "gone.png")]) == 2
    assert _one_line_error(capsys) == f"error: image not found: {tmp_path / 'gone.png'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "models"] and not any((tmp_path / "models").iterdir())
    with pytest.raises(SystemExit):
        export.main(["--weights-path", "m.pth", "--out", str(tmp_path / "m.onnx"), "--opset", "10"])
    assert "--opset: 10 must be >= 11" in capsys.readouterr().err


def test_an_onnx_model_that_is_not_one_is_one_line(tiny_coco, tmp_path, capsys):
    """A corrupt file, a checkpoint renamed .onnx, an ONNX graph tools/export.py did not write, a missing file:
    predict.py says which in one line and writes nothing."""
    import onnx
    import predict

    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 10)
    make_checkpoint(tmp_path / "renamed.onnx", "maskrcnn")
    node = onnx.helper.make_node("Identity", ["image"], ["boxes"])
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "foreign", [tensor("image", onnx.TensorProto.FLOAT, [3, None, None])],
                                   [tensor("boxes", onnx.TensorProto.FLOAT, [3, None, None])])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    image = str(tiny_coco / "images" / "val_001.png")
    for name, says in (("corrupt.onnx", f"cannot load ONNX model {tmp_path / 'corrupt.onnx'}: "),
                       ("renamed.onnx", f"cannot load ONNX model {tmp_path / 'renamed.onnx'}: "),
                       ("foreign.onnx", "foreign.onnx was not exported by tools/export.py"),
                       ("missing.onnx", f"ONNX model not found: {tmp_path / 'missing.onnx'}")):
        assert predict.main(["--weights-path", str(tmp_path / name), image, "--output-dir", str(tmp_path / "p")]) == 2
        assert says in _one_line_error(capsys)
    assert not (tmp_path / "p").exists()


def detections(boxes: list[list[float]], scores: list[float]) -> dict[str, torch.Tensor]:
    count = len(scores)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.ones(count, dtype=torch.int64), "masks": torch.full((count, 1, 4, 4), 0.5)}


def test_compare_matches_detections_by_box_not_by_order():
    reference = detections([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [0.9, 0.8, 0.1])
    exported = detections([[20, 20, 40, 40.01], [0, 0, 10, 10]], [0.8, 0.9])  # reordered; the 0.1 one is gone
    differences = export.compare(reference, exported)
    assert differences["detections"] == 3 and differences["unmatched"] == 1
    assert differences["boxes"] == pytest.approx(0.01, abs=1e-4) and differences["scores"] == pytest.approx(0.0)


def test_compare_refuses_a_missing_confident_detection():
    reference = detections([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.6])
    exported = detections([[0, 0, 10, 10], [100, 100, 120, 120]], [0.9, 0.6])  # the 0.6 one moved away
    with pytest.raises(export.UserError, match=r"misses 1 of PyTorch's detections scoring >= 0.5 .*0\.600"):
        export.compare(reference, exported)
