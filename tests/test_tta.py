"""Test-time flips: detections mapped back from each flip, merged by mask matching, and the --tta flags."""
from __future__ import annotations

import json
import types

import pytest
import torch

import predict
import validation
from network_files import ModelConfig, build_model
from train_utils.engine.checkpoint import save_checkpoint
from train_utils.inference.tta import VIEWS, FlipTTA, _unflip, merge_views
from train_utils.masks import as_box_masks

H, W = 40, 60


def detection(box: list[float], score: float, label: int = 1) -> dict[str, torch.Tensor]:
    masks = torch.zeros(1, 1, H, W)
    x0, y0, x1, y1 = map(int, box)
    masks[0, 0, y0:y1, x0:x1] = 0.9
    return {"boxes": torch.tensor([box]), "labels": torch.tensor([label]), "scores": torch.tensor([score]),
            "masks": masks}


def concat(*outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([o[key] for o in outputs]) for key in outputs[0]}


def test_unflip_maps_boxes_and_masks_back():
    original = detection([5, 10, 20, 30], 0.9)
    for dims in VIEWS:
        flipped = {**original, "masks": original["masks"].flip(dims) if dims else original["masks"]}
        boxes = original["boxes"].clone()
        if -1 in dims:
            boxes[:, [0, 2]] = W - original["boxes"][:, [2, 0]]
        if -2 in dims:
            boxes[:, [1, 3]] = H - original["boxes"][:, [3, 1]]
        back = _unflip({**flipped, "boxes": boxes}, dims, (H, W))
        assert torch.equal(back["boxes"], original["boxes"]) and torch.equal(back["masks"].full(), original["masks"])
        boxed = _unflip({**flipped, "boxes": boxes, "masks": as_box_masks(flipped["masks"])}, dims, (H, W))
        assert torch.equal(boxed["masks"].full(), original["masks"])


def test_matched_views_average_and_a_lone_detection_keeps_a_quarter():
    a = detection([5, 10, 20, 30], 0.8)
    shifted = detection([6, 10, 21, 30], 0.6)  # the same chromosome, one pixel off, in another view
    lone = detection([40, 5, 55, 15], 0.9)  # seen in one view only
    views = [concat(a, lone), shifted, a, shifted]
    merged = merge_views(views, score_thresh=0.0)
    assert merged["scores"].tolist() == pytest.approx([(0.8 + 0.6 + 0.8 + 0.6) / 4, 0.9 / 4])
    masks = merged["masks"].full()
    assert masks.shape == (2, 1, H, W) and merged["masks"].regions[0].tolist() == [5, 10, 21, 30]  # the views' union
    assert masks[0, 0, 20, 5].item() == pytest.approx(0.9 / 2)  # covered in two of the four views
    assert masks[0, 0, 20, 10].item() == pytest.approx(0.9)
    boxed = merge_views([{**view, "masks": as_box_masks(view["masks"])} for view in views], score_thresh=0.0)
    assert torch.equal(boxed["masks"].full(), masks) and torch.equal(boxed["boxes"], merged["boxes"])
    assert merged["boxes"][0].tolist() == [6, 10, 20, 30]  # the merged mask's box: where two views of four agree
    kept = merge_views(views, score_thresh=0.5)
    assert len(kept["scores"]) == 1  # the lone detection's 0.225 is below the threshold


def test_the_merge_keeps_at_most_the_detections_asked_for_best_first():
    """Four views of different detections merge into up to 4x the model's --detections-per-img (392 of 98 seen at
    score 0); the cap keeps the flag's value, the best merged scores."""
    views = [detection([5 + 12 * k, 5, 15 + 12 * k, 30], 0.9 - 0.1 * k) for k in range(4)]
    assert len(merge_views(views)["scores"]) == 4
    capped = merge_views(views, max_detections=2)
    assert capped["scores"].tolist() == pytest.approx([0.9 / 4, 0.8 / 4]) and len(capped["masks"]) == 2
    assert capped["boxes"][:, 0].tolist() == [5, 17]
    exported = types.SimpleNamespace(config=ModelConfig(box_detections_per_img=7))  # an ONNX model has no roi_heads
    assert FlipTTA(exported).max_detections == 7 and FlipTTA(exported, max_detections=3).max_detections == 3


def test_two_crossing_chromosomes_stay_two():
    horizontal, vertical = detection([5, 15, 55, 22], 0.9), detection([28, 2, 35, 38], 0.85)
    merged = merge_views([concat(horizontal, vertical)] * 4)
    assert len(merged["scores"]) == 2 and merged["scores"].tolist() == pytest.approx([0.9, 0.85])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(min_size=128, max_size=160, trainable_layers=0, norm_layer="frozen_bn",
                         box_detections_per_img=5)
    path = tmp_path_factory.mktemp("ckpt") / "m.pth"
    save_checkpoint({"model": build_model(config).state_dict(), "model_config": config.to_dict(), "epoch": 0,
                     "label_names": {1: "chromosome"}, "label_to_cat_id": {1: 1}}, path)
    return path


def test_flip_tta_wraps_a_real_detector(checkpoint, monkeypatch):
    from train_utils.engine.checkpoint import load_model_from_checkpoint
    from train_utils.inference import tta as tta_module

    model, _, _ = load_model_from_checkpoint(checkpoint, "cpu")
    model.roi_heads.score_thresh = 0.0
    tta = FlipTTA(model).eval()
    image = torch.rand(3, 96, 128)
    views, detect = [], tta_module.detect  # each flipped view runs through the one inference path, detect

    def spy(model_, images, mask_thresh=0.5):
        views.append((model_, images[0]))
        return detect(model_, images, mask_thresh)

    monkeypatch.setattr(tta_module, "detect", spy)
    with torch.no_grad():
        (out,) = tta([image])
        plain = model([image])[0]
    assert [m for m, _ in views] == [model] * 4
    assert all(torch.equal(seen, image.flip(dims) if dims else image) for (_, seen), dims in zip(views, VIEWS))
    assert out["masks"].size == (96, 128) and len(out["scores"]) >= 1
    assert out["scores"].max() <= plain["scores"].max() + 1e-6  # a mean over views never beats the best view
    assert len(plain["scores"]) == len(out["scores"]) == 5  # --detections-per-img 5: no more with flips
    assert out["scores"].tolist() == sorted(out["scores"].tolist(), reverse=True)
    with pytest.raises(RuntimeError, match="inference"):
        tta.train()([image])


def test_tta_is_refused_where_it_cannot_apply(capsys):
    for main, argv, says in ((validation.main, ["--results-json", "r.json", "--data-path", "D"],
                              "argument --tta: goes with --weights-path"),
                             (predict.main, ["--weights-path", "m.pth", "x.png", "--save-overlap-maps"],
                              "argument --tta: not with --save-overlap-maps")):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--tta"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and says in err, err


def test_tta_flags(tiny_coco, checkpoint, tmp_path, capsys):
    out = tmp_path / "pred"
    assert predict.main(["--weights-path", str(checkpoint), str(tiny_coco / "images" / "val_001.png"),
                         "--output-dir", str(out), "--device", "cpu", "--score-thresh", "0.0", "--tta"]) == 0
    assert json.loads((out / "images.json").read_text())["images"][0]["num_detections"] >= 1
    assert validation.main(["--weights-path", str(checkpoint), "--data-path", str(tiny_coco), "--device", "cpu",
                            "-j", "0", "--output-dir", str(tmp_path / "val"), "--tta"]) == 0
    assert json.loads((tmp_path / "val" / "record_mAP.json").read_text())["tta"] is True
