"""Stain polarity: the detector on synthetic Q-band / G-band spreads, real BioImLab images and high bit depths; the
training datasets brought to one look; predict.py matching each image to the checkpoint's polarity."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from my_dataset_chromosome import ChromosomeDataset, read_image
from network_files import ModelConfig, build_model
from tools.coco_layout import write_coco_split
from tools.synth_metaphase import SynthConfig, image_seed, render_metaphase
from train_utils.engine.checkpoint import save_checkpoint
from train_utils.distributed import DistInfo
from train_utils.engine.setup import match_stain
from train_utils.stain import (
    BRIGHT_ON_DARK,
    DARK_ON_BRIGHT,
    checkpoint_polarity,
    detect_polarity,
    images_to_invert,
    majority,
    needs_inversion,
    polarity_contrast,
)

LOOK = {"qband": BRIGHT_ON_DARK, "gband": DARK_ON_BRIGHT}


def spread(stain: str, index: int, seed: int = 11) -> tuple[np.ndarray, list[dict]]:
    """A small synthetic spread (uint8 [H, W]) and its annotations; the same seed and index give the same layout
    in both stains."""
    return render_metaphase(image_seed(seed, "train", index), SynthConfig(width=256, height=192, stain=stain))


@pytest.mark.parametrize("stain", ["qband", "gband"])
def test_the_detector_is_right_on_every_synthetic_spread(stain):
    for index in range(8):  # nuclei, debris, uneven light and noise vary from spread to spread
        image, _ = spread(stain, index)
        assert detect_polarity(image) == LOOK[stain], index
        rgb = torch.from_numpy(np.stack([image] * 3)).float() / 255
        assert detect_polarity(rgb) == LOOK[stain]


def test_the_detector_reads_16_bit_grey_whatever_its_range(tmp_path):
    for stain in ("qband", "gband"):
        image, _ = spread(stain, 0)
        deep = (image.astype(np.uint16) * 16 + 100)  # a 12-bit camera in a 16-bit file
        assert detect_polarity(deep) == LOOK[stain]
        Image.fromarray(deep).save(tmp_path / f"{stain}.tif")
        assert Image.open(tmp_path / f"{stain}.tif").mode == "I;16"
        assert detect_polarity(read_image(tmp_path / f"{stain}.tif")) == LOOK[stain]


def test_a_flat_image_counts_as_bright_on_dark_and_the_contrast_is_signed():
    assert polarity_contrast(np.full((10, 10), 7, dtype=np.uint8)) == 0.0
    assert detect_polarity(np.zeros((10, 10))) == BRIGHT_ON_DARK
    image, _ = spread("qband", 1)
    assert polarity_contrast(image) > 0.5 and polarity_contrast(255 - image) < -0.5
    with pytest.raises(ValueError, match="polarity needs"):
        polarity_contrast(torch.zeros(2, 3, 4, 5))


def test_every_bioimlab_image_is_bright_on_dark(bioimlab):
    files = sorted((bioimlab / "labelme" / "val").glob("*.json"))
    assert len(files) >= 20
    for path in files:
        data = json.loads(path.read_text())["imageData"]
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("L"))
        assert detect_polarity(image) == BRIGHT_ON_DARK, path.name


def test_majority_and_which_images_are_inverted():
    assert majority([BRIGHT_ON_DARK, DARK_ON_BRIGHT, DARK_ON_BRIGHT]) == (
        DARK_ON_BRIGHT, {BRIGHT_ON_DARK: 1, DARK_ON_BRIGHT: 2})
    assert majority([BRIGHT_ON_DARK, DARK_ON_BRIGHT])[0] == BRIGHT_ON_DARK  # a tie
    looks = {1: BRIGHT_ON_DARK, 2: DARK_ON_BRIGHT}
    assert images_to_invert(looks, BRIGHT_ON_DARK, "auto") == {2}
    assert images_to_invert(looks, DARK_ON_BRIGHT, "auto") == {1}
    assert images_to_invert(looks, BRIGHT_ON_DARK, "as-is") == set()
    assert images_to_invert(looks, None, "auto") == set()  # an old checkpoint: as before
    assert images_to_invert(looks, None, "invert") == {1, 2}
    with pytest.raises(ValueError, match="unknown --stain mode 'sometimes'"):
        needs_inversion(BRIGHT_ON_DARK, BRIGHT_ON_DARK, "sometimes")


def test_a_recorded_polarity_that_is_no_polarity_is_refused_and_an_unknown_mode_in_every_parser(capsys):
    """A hand-edited polarity would have inverted every image (it equals neither look); an unknown --stain is
    one line in every script's parser."""
    from errors import UserError
    from train_utils import cli

    assert checkpoint_polarity({"stain": {"polarity": DARK_ON_BRIGHT}}, "m.pth", "auto") == DARK_ON_BRIGHT
    with pytest.raises(UserError, match=r"^m\.onnx records the stain polarity 'bright', which is neither "):
        checkpoint_polarity({"stain": {"polarity": "bright"}}, "m.onnx", "as-is")
    for parse, argv in ((cli.parse_args, ["--data-path", "D"]),
                        (cli.parse_validation_args, ["--weights-path", "m.pth", "--data-path", "D"]),
                        (cli.parse_predict_args, ["--weights-path", "m.pth", "x.png"])):
        with pytest.raises(SystemExit) as exit_info:
            parse([*argv, "--stain", "sometimes"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        assert "argument --stain: invalid choice: 'sometimes'" in err


# ---------------------------------------------------------------------------------------------------------------
# training: one look


def mixed_set(root: Path, stains: list[str]) -> Path:
    """A COCO split whose image k is spread k rendered in ``stains[k]``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k, stain in enumerate(stains, start=1):
        image, anns = spread(stain, k)
        name = f"{stain}_{k}.png"
        Image.fromarray(image).save(root / "images" / name)
        images.append({"id": k, "file_name": name, "width": 256, "height": 192})
        for ann in anns:
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": k})
    write_coco_split(root, "train", images, annotations, [{"id": 1, "name": "chromosome"}])
    write_coco_split(root, "val", images[:2], [a for a in annotations if a["image_id"] <= 2],
                     [{"id": 1, "name": "chromosome"}])
    return root


@pytest.mark.parametrize("mode, inverted, model_look", [
    ("auto", {4}, BRIGHT_ON_DARK), ("as-is", set(), BRIGHT_ON_DARK), ("invert", {1, 2, 3, 4}, DARK_ON_BRIGHT)])
def test_training_converts_the_minority_look(tmp_path, mode, inverted, model_look):
    root = mixed_set(tmp_path, ["qband", "qband", "qband", "gband"])
    train_ds, val_ds = ChromosomeDataset(root, "train"), ChromosomeDataset(root, "val")
    settings, lines = match_stain(mode, None, None, train_ds, val_ds, DistInfo())
    assert train_ds.invert_ids == inverted
    assert settings.polarity == model_look and settings.train_counts == {BRIGHT_ON_DARK: 3, DARK_ON_BRIGHT: 1}
    assert f"3 bright-on-dark and 1 dark-on-bright training image(s); the model learns {model_look}" in lines[-1]
    for index, image_id in enumerate(train_ds.ids):
        image, _ = train_ds[index]
        original = read_image(train_ds.image_path(index))
        expected = 1 - original if image_id in inverted else original
        assert torch.allclose(image, expected)
        if mode == "auto":  # one look for the model
            assert detect_polarity(image) == model_look
    assert val_ds.invert_ids == (inverted & {1, 2})  # validation is brought to the model's look too


def test_a_resumed_run_keeps_the_checkpoints_look(tmp_path):
    root = mixed_set(tmp_path, ["gband", "qband", "qband"])
    train_ds, val_ds = ChromosomeDataset(root, "train"), ChromosomeDataset(root, "val")
    checkpoint = {"stain": {"polarity": DARK_ON_BRIGHT, "train_counts": {BRIGHT_ON_DARK: 0, DARK_ON_BRIGHT: 5}}}
    settings, _ = match_stain("auto", checkpoint, "model_3.pth", train_ds, val_ds, DistInfo())
    assert settings.polarity == DARK_ON_BRIGHT and train_ds.invert_ids == {2, 3}


# ---------------------------------------------------------------------------------------------------------------
# prediction: each image to the checkpoint's look


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str | None, Path]:
    """One untrained model saved as a bright-on-dark, a dark-on-bright and an older (unrecorded) checkpoint."""
    torch.manual_seed(0)
    config = ModelConfig(min_size=128, max_size=160, trainable_layers=0, norm_layer="frozen_bn",
                         box_detections_per_img=3)
    weights = build_model(config).state_dict()
    folder = tmp_path_factory.mktemp("looks")
    paths = {}
    for look in (BRIGHT_ON_DARK, DARK_ON_BRIGHT, None):
        state = {"model": weights, "model_config": config.to_dict(), "epoch": 0}
        if look is not None:
            state["stain"] = {"polarity": look, "train_counts": {look: 4}}
        paths[look] = folder / f"{look or 'old'}.pth"
        save_checkpoint(state, paths[look])
    return paths


@pytest.fixture(scope="module")
def q_and_g_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for stain in ("qband", "gband"):
        Image.fromarray(spread(stain, 3)[0]).save(folder / f"{stain}.png")
    return folder


@pytest.mark.parametrize("look, mode, inverted", [
    (BRIGHT_ON_DARK, "auto", {"gband"}), (DARK_ON_BRIGHT, "auto", {"qband"}), (BRIGHT_ON_DARK, "as-is", set()),
    (BRIGHT_ON_DARK, "invert", {"qband", "gband"}), (None, "auto", set())])
def test_predict_brings_each_image_to_the_checkpoints_look(q_and_g_images, checkpoints, tmp_path, monkeypatch, capsys,
                                                          look, mode, inverted):
    from train_utils.jobs import predict as predict_job

    seen = {}
    real = predict_job.predict_image

    def spy(model, image, *args, **kwargs):
        seen[len(seen)] = image.clone()
        return real(model, image, *args, **kwargs)

    monkeypatch.setattr(predict_job, "predict_image", spy)
    ckpt = checkpoints[look]
    out = tmp_path / "pred"
    argv = ["--weights-path", str(ckpt), str(q_and_g_images), "--output-dir", str(out), "--device", "cpu",
            "--stain", mode]
    assert predict.main(argv) == 0
    entries = json.loads((out / "images.json").read_text())["images"]
    assert [(e["stem"], e["polarity"], e["inverted"]) for e in entries] == [
        ("gband", DARK_ON_BRIGHT, "gband" in inverted), ("qband", BRIGHT_ON_DARK, "qband" in inverted)]
    for k, entry in enumerate(entries):  # what the model saw; the picture keeps the image as it was
        original = read_image(entry["file_name"])
        assert torch.equal(seen[k], 1 - original if entry["inverted"] else original)
        picture = np.asarray(Image.open(out / f"{entry['stem']}_pred.png").convert("L"))
        assert detect_polarity(picture[picture.shape[0] // 8:]) == entry["polarity"]
    note = "records no stain polarity (it predates the record); images are used as they are"
    assert (note in capsys.readouterr().err) == (look is None)
