from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from network_files.config import ModelConfig
from train_utils.jobs.predict import (
    InferenceError,
    PredictionsWriter,
    expand_inputs,
    is_out_of_memory,
    label_maps,
    output_stems,
    overlap_map_images,
    overlay,
    paste_detections,
    predict_image,
    prepare_model,
    write_predictions,
)
from train_utils.outputs.visualize import OVERLAP_COLOR

H, W = 48, 64


def touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 6), 100).save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------------------------
# inputs and output names


def test_expand_a_file_a_folder_and_a_glob(tmp_path):
    single = touch_image(tmp_path / "one" / "cell.tif")
    folder = tmp_path / "many"
    b, a = touch_image(folder / "b.png"), touch_image(folder / "a.JPG")
    (folder / "notes.txt").write_text("not an image")
    touch_image(folder / ".hidden.png")
    (folder / "sub").mkdir()
    touch_image(folder / "sub" / "deep.png")
    found = expand_inputs([single, str(folder), str(tmp_path / "**" / "deep.png")])
    assert found == [single, a, b, folder / "sub" / "deep.png"]  # folders sorted, not recursive; glob recursive


def test_expand_drops_duplicates_and_keeps_a_named_file_of_any_suffix(tmp_path):
    image = touch_image(tmp_path / "x.png")
    odd = touch_image(tmp_path / "scan.data")
    assert expand_inputs([str(image), str(tmp_path), str(tmp_path / "*.png"), str(odd)]) == [image, odd]


def test_expand_errors_name_the_culprit(tmp_path):
    with pytest.raises(InferenceError, match=r"'.*missing\.png' matches no file or folder"):
        expand_inputs([str(tmp_path / "missing.png")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(InferenceError, match=r"folder .*empty holds no images"):
        expand_inputs([empty])
    with pytest.raises(InferenceError, match=r"matches 1 path\(s\) but no images"):
        expand_inputs([str(empty / "*.md")])


def test_output_stems_never_collide():
    paths = [Path("/d/a/img.png"), Path("/d/b/img.png"), Path("/d/c/x.png"), Path("/d/c/x.tif"),
             Path("/d/c/Cell.png"), Path("/d/e/cell.png"), Path("/d/f/solo.png")]
    stems = output_stems(paths)
    assert stems == ["a__img", "b__img", "x_png", "x_tif", "c__Cell", "e__cell", "solo"]
    assert output_stems([Path("/d/A.png"), Path("/d/a.png")]) == ["A_png", "a_png-2"]  # one file on a case-blind disk


# ---------------------------------------------------------------------------------------------------------------
# outputs


def hand_output(overlap_scores: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Two crossing bars and a free one, as a model would return them ([N, 1, H, W] probabilities)."""
    masks = torch.zeros(3, 1, H, W)
    masks[0, 0, 20:26, 5:40] = 0.9
    masks[1, 0, 5:45, 18:24] = 0.8
    masks[2, 0, 10:40, 50:56] = 0.7
    out = {
        "boxes": torch.tensor([[5.0, 20, 39, 25], [18, 5, 23, 44], [50, 10, 55, 39]]),
        "labels": torch.tensor([1, 1, 2]),
        "scores": torch.tensor([0.9, 0.6, 0.3]),
        "masks": masks,
    }
    if overlap_scores is not None:
        out["overlap_scores"] = torch.tensor(overlap_scores)
        for key in ("overlap_mask", "overlap_edge", "overlap_else_mask", "overlap_else_edge"):
            out[key] = masks * 0.5
    return out


def first(output: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    return {k: v[:count] for k, v in output.items()}


def test_overlay_outlines_only_detections_predicted_overlapping():
    image = torch.zeros(3, H, W)
    names = {1: "chromosome", 2: "marker"}
    marked = np.asarray(overlay(image, hand_output([0.9, 0.2, 0.1]), names, overlap_thresh=0.5))
    red = np.all(marked == OVERLAP_COLOR, axis=-1)
    assert red.any()
    unmarked = np.asarray(overlay(image, hand_output([0.4, 0.2, 0.1]), names, overlap_thresh=0.5))
    assert not np.all(unmarked == OVERLAP_COLOR, axis=-1).any()
    maskrcnn = np.asarray(overlay(image, hand_output(), names))
    assert not np.all(maskrcnn == OVERLAP_COLOR, axis=-1).any()
    empty = overlay(image, first(hand_output([0.9, 0.9, 0.9]), 0), names, title="none")
    assert empty.width >= W


def roi_output(overlap: bool = False) -> dict[str, torch.Tensor]:
    """Five detections as the RoI heads return them: boxes at image size, ``[N, 1, 28, 28]`` mask probabilities."""
    torch.manual_seed(0)
    out = {
        "boxes": torch.tensor([[5.0, 20, 39, 25], [18, 5, 23, 44], [50, 10, 55, 39], [0, 0, 63, 47], [30, 30, 31, 31]]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
        "labels": torch.ones(5, dtype=torch.int64),
        "masks": torch.rand(5, 1, 28, 28),
    }
    if overlap:
        for key in ("overlap_mask", "overlap_edge", "overlap_else_mask", "overlap_else_edge"):
            out[key] = torch.rand(5, 1, 28, 28)
    return out


@pytest.mark.parametrize("paste_bytes", [1, 2 * 4 * H * W, 10**9])  # one mask, two masks, all at once
def test_pasting_in_pieces_gives_torchvisions_masks_as_bool(paste_bytes):
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    rois = roi_output(overlap=True)
    out = paste_detections(rois, (H, W), mask_thresh=0.5, paste_bytes=paste_bytes)
    full = paste_masks_in_image(rois["masks"], rois["boxes"], (H, W))
    assert out["masks"].dtype == torch.bool and out["masks"].shape == (5, 1, H, W)
    assert torch.equal(out["masks"], full > 0.5)
    edge = paste_masks_in_image(rois["overlap_edge"], rois["boxes"], (H, W))[:, 0].amax(dim=0)
    assert out["overlap_edge"].shape == (H, W) and torch.allclose(out["overlap_edge"], edge)
    none = paste_detections(first(rois, 0), (H, W), paste_bytes=paste_bytes)
    assert none["masks"].shape == (0, 1, H, W) and not none["overlap_mask"].any()


@pytest.mark.parametrize("name", ["maskrcnn", "dacseg"])
def test_predict_image_matches_the_models_own_forward(name):
    from network_files import build_model

    torch.manual_seed(0)
    config = ModelConfig(name=name, min_size=128, max_size=160, trainable_layers=0, norm_layer="frozen_bn",
                         box_detections_per_img=5, overlap_cls_head="conv")
    model = build_model(config).eval()
    prepare_model(model, config, score_thresh=0.0)
    image = torch.rand(3, 90, 120)
    with torch.no_grad():
        expected = model([image])[0]
    output, seconds = predict_image(model, image, "cpu", mask_thresh=0.5, paste_bytes=1)
    assert seconds > 0 and len(output["scores"]) == 5
    assert torch.allclose(output["boxes"], expected["boxes"]) and torch.equal(output["labels"], expected["labels"])
    assert torch.equal(output["masks"], expected["masks"] > 0.5)
    if name == "dacseg":
        assert torch.allclose(output["overlap_scores"], expected["overlap_scores"])


def test_overlap_maps_are_grey_pictures_of_the_maximum():
    rois = roi_output(overlap=True)
    out = paste_detections(rois, (H, W))
    pictures = overlap_map_images(out)
    assert set(pictures) == {"overlap_mask", "overlap_edge", "overlap_else_mask", "overlap_else_edge"}
    grey = np.asarray(pictures["overlap_mask"])
    assert pictures["overlap_mask"].mode == "L" and grey.shape == (H, W)
    assert np.array_equal(grey, (out["overlap_mask"] * 255).round().to(torch.uint8).numpy())
    none = overlap_map_images(paste_detections(first(rois, 0), (H, W)))
    assert (np.asarray(none["overlap_edge"]) == 0).all() and none["overlap_edge"].size == (W, H)


def test_out_of_memory_is_recognised_and_other_errors_are_not():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 144000000 bytes."))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape '[2, 3]' is invalid for input of size 5"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_predictions_json_has_one_result_per_line(tmp_path):
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.9,
         "segmentation": {"size": [4, 5], "counts": "abc"}, "overlap_score": 0.25},
        {"image_id": 2, "category_id": 3, "bbox": [0.5, 0.0, 1.0, 1.0], "score": 0.5},
    ]
    path = tmp_path / "predictions.json"
    write_predictions(results, path)
    assert path.read_text() == (
        '[\n'
        '{"image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.9, '
        '"segmentation": {"size": [4, 5], "counts": "abc"}, "overlap_score": 0.25},\n'
        '{"image_id": 2, "category_id": 3, "bbox": [0.5, 0.0, 1.0, 1.0], "score": 0.5}\n'
        ']\n'
    )
    assert json.loads(path.read_text()) == results
    write_predictions([], path)
    assert path.read_text() == "[]\n"


def test_predictions_writer_leaves_a_whole_json_file_after_every_image(tmp_path):
    path = tmp_path / "predictions.json"
    writer = PredictionsWriter(path)
    assert json.loads(path.read_text()) == []
    seen = []
    for image_id, count in [(1, 2), (2, 0), (3, 1)]:
        batch = [{"image_id": image_id, "score": 0.5 + k / 10} for k in range(count)]
        writer.add(batch)
        seen += batch
        assert json.loads(path.read_text()) == seen  # readable at every step, not only after close
    writer.close()
    assert path.read_text().count("\n") == len(seen) + 2


# ---------------------------------------------------------------------------------------------------------------
# labels and model preparation


def test_label_maps_come_from_the_checkpoint_or_a_label_json(tmp_path):
    config = ModelConfig(num_classes=2)
    checkpoint = {"label_names": {1: "chromosome", 2: "marker"}, "label_to_cat_id": {1: 7, 2: 9}}
    assert label_maps(checkpoint, config) == ({1: "chromosome", 2: "marker"}, {1: 7, 2: 9})
    assert label_maps({}, config) == ({1: "class 1", 2: "class 2"}, {1: 1, 2: 2})
    renamed = tmp_path / "labels.json"
    renamed.write_text('{"1": "A", "2": "B"}')
    assert label_maps(checkpoint, config, renamed)[0] == {1: "A", 2: "B"}
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"1": "A"}')
    with pytest.raises(InferenceError, match=r"wrong\.json names labels \[1\] but the model has 2 class"):
        label_maps(checkpoint, config, wrong)


def test_prepare_model_sets_the_score_threshold_and_asks_for_maps():
    model = SimpleNamespace(roi_heads=SimpleNamespace(score_thresh=0.05, return_overlap_maps=False))
    prepare_model(model, ModelConfig(name="dacseg"), score_thresh=0.01, overlap_maps=True)
    assert model.roi_heads.score_thresh == 0.01 and model.roi_heads.return_overlap_maps
    prepare_model(model, ModelConfig(name="dacseg"), score_thresh=0.5)
    # raised too: detections below the threshold are dropped before their masks are pasted at full size
    assert model.roi_heads.score_thresh == 0.5 and not model.roi_heads.return_overlap_maps
    with pytest.raises(InferenceError, match="DaCSeg"):
        prepare_model(model, ModelConfig(name="maskrcnn"), score_thresh=0.5, overlap_maps=True)
