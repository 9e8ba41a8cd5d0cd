from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from network_files.config import ModelConfig
from train_utils.inference import (
    InferenceError,
    expand_inputs,
    keep_confident,
    label_maps,
    output_stems,
    overlap_map_images,
    overlay,
    prepare_model,
    write_predictions,
)
from train_utils.visualize import OVERLAP_COLOR

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


def test_keep_confident_filters_every_per_detection_entry():
    out = keep_confident(hand_output([0.9, 0.2, 0.7]), 0.5)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert out["boxes"].shape == (2, 4) and out["masks"].shape == (2, 1, H, W)
    assert out["overlap_scores"].tolist() == pytest.approx([0.9, 0.2])
    assert out["overlap_edge"].shape == (2, 1, H, W)
    assert keep_confident(hand_output(), 0.95)["masks"].shape == (0, 1, H, W)


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
    empty = overlay(image, keep_confident(hand_output([0.9, 0.9, 0.9]), 0.99), names, title="none")
    assert empty.width >= W


def test_overlap_maps_are_the_maximum_over_detections():
    pictures = overlap_map_images(hand_output([0.9, 0.2, 0.1]), (H, W))
    assert set(pictures) == {"overlap_mask", "overlap_edge", "overlap_else_mask", "overlap_else_edge"}
    grey = np.asarray(pictures["overlap_mask"])
    assert pictures["overlap_mask"].mode == "L" and grey.shape == (H, W)
    assert grey[22, 20] == round(255 * 0.45)  # the crossing: max(0.9, 0.8) * 0.5
    assert grey[30, 52] == round(255 * 0.35) and grey[0, 0] == 0
    none = overlap_map_images(keep_confident(hand_output([0.9, 0.2, 0.1]), 0.99), (H, W))
    assert (np.asarray(none["overlap_edge"]) == 0).all() and none["overlap_edge"].size == (W, H)


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


def test_prepare_model_lowers_the_score_threshold_and_asks_for_maps():
    model = SimpleNamespace(roi_heads=SimpleNamespace(score_thresh=0.05, return_overlap_maps=False))
    prepare_model(model, ModelConfig(name="dacseg"), score_thresh=0.01, overlap_maps=True)
    assert model.roi_heads.score_thresh == 0.01 and model.roi_heads.return_overlap_maps
    prepare_model(model, ModelConfig(name="dacseg"), score_thresh=0.5)
    assert model.roi_heads.score_thresh == 0.01 and not model.roi_heads.return_overlap_maps  # never raised
    with pytest.raises(InferenceError, match="DaCSeg"):
        prepare_model(model, ModelConfig(name="maskrcnn"), score_thresh=0.5, overlap_maps=True)
