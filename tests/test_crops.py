"""Karyotype crops: upright along the principal axis at the true length, the mask on a clean background, the contact
sheet longest first, and predict.py --crops writing crops, sheets and crops.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bar_polygon
from PIL import Image, ImageDraw

import predict
from network_files import ModelConfig, build_model
from train_utils.engine.checkpoint import save_checkpoint
from train_utils.outputs.crops import Crop, contact_sheet, crop_background, make_crop, upright_angle


def bar_mask(length: float, width: float, angle: float, size=(200, 160), centre=(100, 80)) -> np.ndarray:
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).polygon(bar_polygon(*centre, length, width, angle), fill=255)
    return np.asarray(canvas) > 0


@pytest.mark.parametrize("angle", [0, 20, 45, 90, 120, 170])
def test_a_bar_comes_out_upright_at_its_true_length(angle):
    mask = bar_mask(80, 12, angle)
    assert abs(((upright_angle(mask) - (90 + angle)) + 90) % 180 - 90) < 1.5  # the bar's axis, turned vertical
    image = np.zeros((160, 200, 3), dtype=np.uint8)
    image[mask] = (200, 150, 100)
    image[~mask] = (30, 30, 30)  # the field around it must not reach the crop
    crop = make_crop(image, mask, background=(255, 255, 255), margin=5)
    assert abs(crop.length_px - 80) <= 3 and crop.area_px == int(mask.sum())
    width, height = crop.picture.size
    assert height == crop.length_px + 10 and abs(width - 10 - 12) <= 3  # vertical, framed by the margin
    pixels = np.asarray(crop.picture)
    assert (pixels[:5] == 255).all() and (pixels[:, :5] == 255).all()  # the margin is background
    centre = pixels[height // 2, width // 2]
    assert np.abs(centre.astype(int) - (200, 150, 100)).max() <= 2  # the chromosome's own pixels
    assert not (np.abs(pixels.astype(int) - 30).max(axis=-1) <= 3).any()  # nothing of the field
    x, y, w, h = crop.bbox
    assert mask[y:y + h, x:x + w].sum() == mask.sum()
    boxed = make_crop(image, mask[y - 3:y + h, x - 2:], background=(255, 255, 255), margin=5, origin=(x - 2, y - 3))
    assert boxed.bbox == crop.bbox and np.array_equal(np.asarray(boxed.picture), pixels)  # a box-sized mask


def test_crop_height_scales_and_an_empty_mask_is_refused():
    mask = bar_mask(60, 10, 30)
    image = np.full((160, 200, 3), 128, dtype=np.uint8)
    crop = make_crop(image, mask, (0, 0, 0), margin=4, height=200)
    assert crop.picture.height == 200 and abs(crop.length_px - 60) <= 3
    with pytest.raises(ValueError, match="empty"):
        make_crop(image, np.zeros_like(mask), (0, 0, 0))


def test_crop_background_follows_the_stain_unless_chosen():
    assert crop_background("auto", "dark-on-bright") == (255, 255, 255)
    assert crop_background("auto", "bright-on-dark") == (0, 0, 0)
    assert crop_background("white", "bright-on-dark") == (255, 255, 255)
    with pytest.raises(ValueError, match="unknown crop background"):
        crop_background("grey", "bright-on-dark")


def test_the_contact_sheet_puts_the_longest_first():
    def solid(height: int, colour) -> Crop:
        return Crop(Image.new("RGB", (20, height), colour), 0.0, height, 20 * height, [0, 0, 20, height])

    sheet = contact_sheet([(1, solid(30, (255, 0, 0))), (2, solid(90, (0, 255, 0))), (3, solid(60, (0, 0, 255)))],
                          (0, 0, 0), "cell")
    pixels = np.asarray(sheet)
    strip, label = 28, 20
    first = pixels[strip + label + 10, :pixels.shape[1] // 3]
    assert ((first == (0, 255, 0)).all(axis=-1)).any()  # the 90 px crop, number 2, comes first
    assert sheet.height >= strip + label + 90


def test_predict_writes_upright_crops_a_sheet_and_crops_json(tmp_path, monkeypatch):
    """Two known bars stand in for the model's detections: their lengths and angles are the truth."""
    from train_utils.jobs import predict as predict_job

    bars = [(70, 10, 30.0), (40, 9, 150.0)]
    masks = torch.from_numpy(np.stack([bar_mask(*bar) for bar in bars]))[:, None]
    image = np.where(masks.any(dim=0)[0].numpy(), 220, 25).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "cell.png")

    def known(model, image, device, mask_thresh=0.5, **kwargs):
        boxes = torch.tensor([[60.0, 40, 140, 120], [80, 60, 120, 100]])
        return {"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64), "scores": torch.tensor([0.9, 0.8]),
                "masks": masks}, 0.01

    monkeypatch.setattr(predict_job, "predict_image", known)
    torch.manual_seed(0)
    config = ModelConfig(min_size=128, max_size=160, trainable_layers=0, norm_layer="frozen_bn")
    ckpt = tmp_path / "m.pth"
    save_checkpoint({"model": build_model(config).state_dict(), "model_config": config.to_dict(), "epoch": 0}, ckpt)
    crops = tmp_path / "crops"
    assert predict.main(["--weights-path", str(ckpt), str(tmp_path / "cell.png"), "--output-dir", str(tmp_path / "p"),
                         "--device", "cpu", "--crops", str(crops), "--crop-margin", "4"]) == 0
    text = (crops / "crops.json").read_text()
    entries = json.loads(text)
    assert text.count("\n") == len(entries) + 2  # one crop per line
    assert [(e["detection"], e["crop_file"]) for e in entries] == [(1, "cell_001.png"), (2, "cell_002.png")]
    for entry, (length, _, angle) in zip(entries, bars):
        assert abs(entry["length_px"] - length) <= 3 and entry["score"] in (0.9, 0.8)
        assert abs(((entry["angle_deg"] - (90 + angle)) + 90) % 180 - 90) < 1.5
        assert Path(entry["source"]).name == "cell.png" and entry["image_id"] == 1
        with Image.open(crops / entry["crop_file"]) as picture:
            assert picture.height == entry["length_px"] + 8 and picture.getpixel((0, 0)) == (0, 0, 0)  # Q-band: black
    with Image.open(crops / "cell_sheet.png") as sheet:
        assert sheet.width >= 2 * 20 and sheet.height > 70


def test_a_refused_crops_folder_is_one_line_and_leaves_nothing_behind(tiny_coco, tmp_path, capsys):
    """--crops naming a file (or a folder below one) used to leave an empty --output-dir behind; bad sizes are
    refused by the parser."""
    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", min_size=128, max_size=160, trainable_layers=0, norm_layer="frozen_bn")
    ckpt = tmp_path / "m.pth"
    save_checkpoint({"model": build_model(config).state_dict(), "model_config": config.to_dict(), "epoch": 0}, ckpt)
    taken = tmp_path / "taken"
    taken.write_text("a file where the crops folder should go")
    out = tmp_path / "p"
    for crops, says in ((taken, f"--crops {taken} is a file, not a folder"),
                        (taken / "sub", f"--crops {taken / 'sub'}: cannot write there ({taken} is a file)")):
        assert predict.main(["--weights-path", str(ckpt), str(tiny_coco / "images" / "val_001.png"), "--output-dir",
                             str(out), "--device", "cpu", "--crops", str(crops)]) == 2
        assert capsys.readouterr().err == f"error: {says}\n"
        assert not out.exists()
    for flag, value in (("--crop-height", "0"), ("--crop-margin", "-1"), ("--crop-background", "grey")):
        with pytest.raises(SystemExit) as exit_info:
            predict.main(["--weights-path", str(ckpt), "x.png", "--crops", str(out), flag, value])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and f"argument {flag}: " in err, err
