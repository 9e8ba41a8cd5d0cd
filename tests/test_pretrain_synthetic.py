"""The synthetic pretrain-then-fine-tune path (tools/pretrain_synthetic.py) end to end on tiny data, the fine-tuned
checkpoint through validation.py and predict.py, and what --pretrained says about a checkpoint of another class count,
backbone or stain."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

import predict
import train
import validation
from network_files import ModelConfig
from my_dataset_chromosome import ChromosomeDataset
from tests.test_stain import mixed_set
from tools import pretrain_synthetic
from train_utils.distributed import DistInfo
from train_utils.engine.pretrained import PretrainedRecord, check_pretrained
from train_utils.engine.setup import match_stain
from train_utils.stain import BRIGHT_ON_DARK, DARK_ON_BRIGHT

TINY_MODEL = ["--device", "cpu", "--workers", "0", "-b", "2", "--backbone", "resnet18", "--min-size", "128",
              "--max-size", "160", "--rois-per-image", "16", "--detections-per-img", "20", "--seed", "0"]


@pytest.fixture(scope="module")
def pipeline(tiny_coco, tmp_path_factory) -> tuple[Path, str]:
    """One run of the tool: 2 synthetic spreads, 1 pretraining epoch, 1 fine-tuning epoch on the tiny set."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        code = pretrain_synthetic.main(["--data-path", str(tiny_coco), "--output-dir", str(out), "--synth-images", "2",
                                        "--pretrain-epochs", "1", "--epochs", "1", *TINY_MODEL])
    assert code == 0, log.getvalue()
    return out, log.getvalue()


def test_the_synthetic_set_matches_the_labs_look(pipeline, tiny_coco):
    out, log = pipeline
    info = json.loads((out / "synth" / "annotations" / "instances_train.json").read_text())["info"]["config"]
    assert (info["width"], info["height"], info["stain"]) == (160, 128, "qband")  # the tiny set: bright bars on dark
    assert info["chromosome_scale"] > 1  # its bars are larger than the generator's chromosomes at 160x128
    assert "are bright-on-dark, median 160x128" in log


def test_pretrain_then_finetune_validates_and_predicts(pipeline, tiny_coco, tmp_path):
    out, log = pipeline
    assert (out / "pretrain" / "model_0.pth").is_file()
    assert f"pretrained: {out / 'pretrain' / 'model_0.pth'} is a DaCSeg maskrcnn checkpoint (resnet18" in log
    assert "missing 0 tensors" in log  # every tensor of the pretraining went into the fine-tuned model
    finetuned = out / "finetune" / "model_0.pth"
    assert validation.main(["--weights-path", str(finetuned), "--data-path", str(tiny_coco), "--split", "val",
                            "--output-dir", str(tmp_path / "val"), "--device", "cpu"]) == 0
    assert "AP" in json.loads((tmp_path / "val" / "record_mAP.json").read_text())["segm"]
    image = tiny_coco / "images" / "val_001.png"
    assert predict.main(["--weights-path", str(finetuned), str(image), "--output-dir", str(tmp_path / "pred"),
                         "--device", "cpu"]) == 0
    assert (tmp_path / "pred" / "val_001_pred.png").is_file()


def test_a_second_run_reuses_the_synthetic_set_and_the_pretraining(pipeline, tiny_coco, capsys):
    out, _ = pipeline
    assert pretrain_synthetic.main(["--data-path", str(tiny_coco), "--output-dir", str(out), "--synth-images", "2",
                                    "--pretrain-epochs", "1", "--skip-finetune", *TINY_MODEL]) == 0
    printed = capsys.readouterr().out
    assert "reusing 2 synthetic train images" in printed and "reusing " + str(out / "pretrain" / "model_0.pth") in printed


def test_a_pretraining_of_another_backbone_is_one_line(pipeline, tiny_coco, tmp_path, capsys):
    out, _ = pipeline
    flags = [f for f in TINY_MODEL if f != "resnet18"]
    flags[flags.index("--backbone")] = "--backbone=resnet34"
    code = train.main(["--data-path", str(tiny_coco), "--output-dir", str(tmp_path / "ft"), "--epochs", "1",
                       "--pretrained", str(out / "pretrain" / "model_0.pth"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "holds a resnet18 backbone but this run builds resnet34; add --backbone resnet18" in err[0]


def test_another_class_count_and_scale_are_reported():
    theirs = ModelConfig(name="maskrcnn", num_classes=1, backbone="resnet18", min_size=288, max_size=384)
    ours = ModelConfig(name="dacseg", num_classes=24, backbone="resnet18", min_size=576, max_size=768)
    lines = check_pretrained(PretrainedRecord("synth.pth", theirs, 7, BRIGHT_ON_DARK), ours)
    assert lines[0] == ("pretrained: synth.pth is a DaCSeg maskrcnn checkpoint (resnet18, 1 class(es), epoch 7, "
                        "trained bright-on-dark)")
    assert "1 class(es) there, 24 here: the class-specific predictors start fresh" in lines[1]
    assert "a maskrcnn checkpoint into a dacseg model" in lines[2]
    assert "--min-size 288 there, 576 here" in lines[3] and "--max-size 384 there, 768 here" in lines[3]


@pytest.mark.parametrize("mode, polarity, inverted", [("auto", BRIGHT_ON_DARK, {1, 2}),
                                                       ("as-is", DARK_ON_BRIGHT, set())])
def test_a_pretraining_on_the_other_stain(tmp_path, mode, polarity, inverted):
    """G-band data after a Q-band pretraining: auto keeps the pretraining's look (the G-band images are inverted),
    as-is trains on them as they are and says that the pretrained features saw the other look."""
    root = mixed_set(tmp_path, ["gband", "gband"])
    train_ds, val_ds = ChromosomeDataset(root, "train"), ChromosomeDataset(root, "val")
    record = PretrainedRecord("synth.pth", ModelConfig(), 3, BRIGHT_ON_DARK)
    settings, lines = match_stain(mode, None, None, train_ds, val_ds, DistInfo(), record)
    printed = "\n".join(lines)
    assert settings.polarity == polarity and train_ds.invert_ids == inverted
    if mode == "auto":
        assert "the model keeps the polarity of --pretrained synth.pth (bright-on-dark)" in printed
    else:
        assert "synth.pth was pretrained bright-on-dark but this run trains dark-on-bright (--stain as-is)" in printed
