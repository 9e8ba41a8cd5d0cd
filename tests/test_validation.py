from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import validation
from network_files import ModelConfig, build_model
from train_utils.engine.checkpoint import save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = {"bbox", "segm", "precision", "recall", "f1", "overlap_segm", "non_overlap_segm", "count_mae",
               "count_exact"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained small Mask R-CNN saved as train.py would (few detections per image keep the mask head quick)."""
    torch.manual_seed(0)
    cfg = ModelConfig(min_size=128, max_size=160, trainable_layers=0, norm_layer="frozen_bn", box_detections_per_img=10)
    model = build_model(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "model_0.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": cfg.to_dict(), "epoch": 0,
                     "label_names": {1: "chromosome"}, "label_to_cat_id": {1: 1}}, path)
    return path


def gt_results(root: Path, split: str = "val") -> list[dict]:
    """The split's ground truth as COCO results with score 1 (RLE masks, as predict.py writes them)."""
    from pycocotools import mask as mask_utils

    doc = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in doc["images"]}
    out = []
    for a in doc["annotations"]:
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], *sizes[a["image_id"]]))
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return out


def run_main(capsys, *argv) -> tuple[int, str, str]:
    rc = validation.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(("error: ", "validation.py: error: ")), err
    return lines[0]


def test_checkpoint_and_predict_round_trip(tiny_coco, checkpoint, tmp_path, capsys):
    import predict

    out = tmp_path / "val"
    rc, stdout, _ = run_main(capsys, "--weights-path", checkpoint, "--data-path", tiny_coco, "--split", "val",
                             "--output-dir", out, "--device", "cpu", "-j", "0", "-b", "1")
    assert rc == 0 and "record in" in stdout
    record = json.loads((out / "record_mAP.json").read_text())
    assert RECORD_KEYS <= set(record) and record["num_images"] == 2 and record["num_gt"] == 8
    assert record["epoch"] == 0 and record["model"] == "maskrcnn" and record["split"] == "val"
    assert len(record["segm"]["stats"]) == 12 and record["segm"]["per_class_AP50"].keys() == {"chromosome"}
    text = (out / "record_mAP.txt").read_text()
    assert text.startswith("bbox COCO results:\n Average Precision  (AP) @[ IoU=0.50:0.95 |")
    assert "\nsegm mAP(IoU=0.5) for each category:\n chromosome     : " in text
    assert "\ncount MAE (per image):          " in text

    # predict.py's predictions.json (kept down to the model's own score floor) scores the same without a model
    pred_dir = tmp_path / "pred"
    assert predict.main(["--weights-path", str(checkpoint), str(tiny_coco / "images" / "val_*.png"),
                         "--output-dir", str(pred_dir), "--device", "cpu", "--score-thresh", "0.05"]) == 0
    capsys.readouterr()
    rc, _, _ = run_main(capsys, "--results-json", pred_dir / "predictions.json", "--data-path", tiny_coco,
                        "--split", "val", "--output-dir", tmp_path / "from_json")
    assert rc == 0
    again = json.loads((tmp_path / "from_json" / "record_mAP.json").read_text())
    assert again["num_detections"] == record["num_detections"]
    for key in ("bbox", "segm"):
        assert again[key]["stats"] == pytest.approx(record[key]["stats"], abs=1e-4)  # JSON rounds boxes and scores
    assert again["count_mae"] == record["count_mae"] and again["f1"] == pytest.approx(record["f1"], abs=1e-4)


def test_results_json_ground_truth_is_perfect(tiny_coco, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(gt_results(tiny_coco)))
    rc, stdout, err = run_main(capsys, "--results-json", results, "--data-path", tiny_coco, "--output-dir", tmp_path)
    assert rc == 0 and err == ""
    assert stdout.startswith("segm AP 1.000  AP50 1.000  P 1.000  R 1.000  F1 1.000  overlap AP 1.000  count MAE 0.00")
    record = json.loads((tmp_path / "record_mAP.json").read_text())
    assert record["segm"]["AP"] == 1.0 and record["f1"] == 1.0 and record["results_json"] == str(results)
    assert "\nprecision (segm):               1.0000\n" in (tmp_path / "record_mAP.txt").read_text()


def test_predict_image_ids_are_matched_by_file(tiny_coco, tmp_path, capsys):
    # predict.py numbers images in input order; images.json says which file each number is
    by_id = {1: tiny_coco / "images" / "train_001.png", 2: tiny_coco / "images" / "val_002.png", 3: Path("val_001.png")}
    (tmp_path / "images.json").write_text(json.dumps(
        {"images": [{"id": i, "file_name": str(p), "width": 160, "height": 128} for i, p in by_id.items()],
         "categories": [{"id": 1, "name": "chromosome"}], "failed": []}))
    renumber = {1: 3, 2: 2}  # val image 1 was predicted as number 3
    results = [dict(r, image_id=renumber[r["image_id"]]) for r in gt_results(tiny_coco)]
    results += [dict(r, image_id=1) for r in gt_results(tiny_coco, "train") if r["image_id"] == 1]  # a train image
    (tmp_path / "predictions.json").write_text(json.dumps(results))
    rc, _, err = run_main(capsys, "--results-json", tmp_path / "predictions.json", "--data-path", tiny_coco,
                          "--output-dir", tmp_path)
    assert rc == 0 and "1 image(s) in" in err and "are not in split 'val'" in err
    record = json.loads((tmp_path / "record_mAP.json").read_text())
    assert record["num_images"] == 2 and record["num_detections"] == 8 and record["segm"]["AP"] == 1.0


def test_bad_inputs_give_one_line(tiny_coco, checkpoint, tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(gt_results(tiny_coco)))
    base = ["--data-path", tiny_coco, "--output-dir", tmp_path / "out"]

    rc, _, err = run_main(capsys, "--weights-path", tmp_path / "missing.pth", *base)
    assert rc == 2 and "missing.pth" in one_error_line(err)
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("not a checkpoint")
    rc, _, err = run_main(capsys, "--weights-path", not_a_checkpoint, *base)
    line = one_error_line(err)
    assert rc == 2 and "notes.pth" in line and "weights_only" not in line  # no advice to load unsafely
    rc, _, err = run_main(capsys, "--results-json", good, *base, "--split", "test")
    assert rc == 2 and "'test'" in one_error_line(err)
    rc, _, err = run_main(capsys, "--results-json", tmp_path / "nope.json", *base)
    assert rc == 2 and "nope.json" in one_error_line(err)

    bad_ids = tmp_path / "bad_ids.json"
    bad_ids.write_text(json.dumps([dict(r, image_id=42) for r in gt_results(tiny_coco)]))
    rc, _, err = run_main(capsys, "--results-json", bad_ids, *base)
    line = one_error_line(err)
    assert rc == 2 and "bad_ids.json" in line and "not in the ground truth: 42" in line
    bad_cat = tmp_path / "bad_cat.json"
    bad_cat.write_text(json.dumps([dict(r, category_id=7) for r in gt_results(tiny_coco)]))
    rc, _, err = run_main(capsys, "--results-json", bad_cat, *base)
    assert rc == 2 and "category id(s) not in the ground truth: 7" in one_error_line(err)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": 1,')
    rc, _, err = run_main(capsys, "--results-json", broken, *base)
    assert rc == 2 and "malformed JSON in" in one_error_line(err)

    rc, _, err = run_main(capsys, "--results-json", good, *base, "--num-classes", "3")
    assert rc == 2 and "--num-classes 3" in one_error_line(err)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "chromosome", "2": "nucleus"}))
    rc, _, err = run_main(capsys, "--weights-path", checkpoint, *base, "--label-json-path", labels)
    assert rc == 2 and "labels.json" in one_error_line(err)
    rc, _, err = run_main(capsys, "--weights-path", checkpoint, *base, "--num-classes", "2")
    assert rc == 2 and "--num-classes 2" in one_error_line(err)
    rc, _, err = run_main(capsys, "--weights-path", checkpoint, *base, "--model", "dacseg")
    assert rc == 2 and "--model dacseg" in one_error_line(err) and "holds a maskrcnn model" in err
    assert not (tmp_path / "out").exists()  # nothing written on error

    (tmp_path / "taken").write_text("a file where the record folder should go")
    rc, _, err = run_main(capsys, "--weights-path", tmp_path / "missing.pth", "--data-path", tmp_path / "nowhere",
                          "--output-dir", tmp_path / "taken", "--tta")  # refused before anything is read or scored
    assert rc == 2 and one_error_line(err) == f"error: --output-dir {tmp_path / 'taken'} is a file, not a folder"

    with pytest.raises(SystemExit) as exc:  # neither source given
        validation.main(["--data-path", str(tiny_coco)])
    assert exc.value.code == 2 and "--weights-path" in one_error_line(capsys.readouterr().err)


def test_checkpoint_for_other_classes_is_refused_before_building(tiny_coco, checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    state["model_config"]["num_classes"] = 3  # the weights would not even fit; the class count is checked first
    other = tmp_path / "three.pth"
    save_checkpoint(state, other)
    rc, _, err = run_main(capsys, "--weights-path", other, "--data-path", tiny_coco, "--output-dir", tmp_path)
    line = one_error_line(err)
    assert rc == 2 and "three.pth was trained for 3 class(es)" in line and "has 1: chromosome" in line


def test_script_runs_from_the_command_line(tiny_coco, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([]))  # zero detections is a valid results file
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "validation.py", "--results-json", str(results), "--data-path",
                           str(tiny_coco), "--output-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "record_mAP.json").read_text())
    assert record["segm"]["AP"] == 0.0 and record["recall"] == 0.0 and record["count_mae"] == 4.0
    assert "record in" in proc.stdout


def test_stain_brings_the_split_to_the_checkpoints_look(tiny_coco, checkpoint, tmp_path, capsys):
    """tiny_coco is bright bars on dark: a dark-on-bright checkpoint sees it inverted under --stain auto, and
    --stain as-is scores exactly what a checkpoint without a recorded polarity scores."""
    state = torch.load(checkpoint, weights_only=True)
    state["stain"] = {"polarity": "dark-on-bright", "train_counts": {"bright-on-dark": 0, "dark-on-bright": 9}}
    dark = tmp_path / "dark.pth"
    save_checkpoint(state, dark)
    common = ("--data-path", tiny_coco, "--device", "cpu", "-j", "0", "--score-thresh", "0.05")
    records = {}
    for name, ckpt, mode in [("auto", dark, "auto"), ("as-is", dark, "as-is"), ("old", checkpoint, "auto")]:
        rc, _, err = run_main(capsys, "--weights-path", ckpt, "--output-dir", tmp_path / name, "--stain", mode, *common)
        assert rc == 0
        assert ("records no stain polarity" in err) == (name == "old")
        records[name] = json.loads((tmp_path / name / "record_mAP.json").read_text())
    assert records["auto"]["stain"] == {"mode": "auto", "model_polarity": "dark-on-bright", "inverted": 2}
    assert "stain: --stain auto, model dark-on-bright, 2 image(s) inverted" in " ".join(
        (tmp_path / "auto" / "record_mAP.txt").read_text().split())
    assert records["as-is"]["stain"]["inverted"] == 0 and records["old"]["stain"]["model_polarity"] is None
    assert records["as-is"]["segm"]["stats"] == records["old"]["segm"]["stats"]
    assert records["as-is"]["num_detections"] == records["old"]["num_detections"]


def test_validation_and_train_test_only_score_a_checkpoint_alike(tiny_coco, checkpoint, tmp_path, capsys):
    """One scoring path: ``validation.py`` and ``train.py --test-only`` give the same record for one checkpoint."""
    import train

    assert validation.main(["--weights-path", str(checkpoint), "--data-path", str(tiny_coco), "--split", "val",
                            "--output-dir", str(tmp_path / "v"), "--device", "cpu", "--workers", "0"]) == 0
    assert train.main(["--data-path", str(tiny_coco), "--val-split", "val", "--resume", str(checkpoint),
                       "--test-only", "--output-dir", str(tmp_path / "t"), "--device", "cpu", "--workers", "0"]) == 0
    capsys.readouterr()
    validated = json.loads((tmp_path / "v" / "record_mAP.json").read_text())
    tested = json.loads((tmp_path / "t" / "record_mAP.json").read_text())
    assert validated["num_detections"] == tested["num_detections"] > 0
    for key in tested:
        assert validated[key] == tested[key], key
    assert (tmp_path / "v" / "record_mAP.txt").read_text().splitlines()[:60] == \
        (tmp_path / "t" / "record_mAP.txt").read_text().splitlines()[:60]


def test_a_shape_prior_checkpoint_round_trips_without_its_codebook_file(tiny_coco, tmp_path, capsys):
    """The codebook travels in the checkpoint: with the file gone, validation.py and predict.py run a DaCSeg model
    with a shape prior."""
    import predict
    from tests.test_shape_prior import write_codebook

    codebook = write_codebook(tmp_path / "codebook.pt")
    torch.manual_seed(0)
    cfg = ModelConfig(name="dacseg", backbone="resnet18", overlap_cls_head="conv", min_size=128, max_size=160,
                      trainable_layers=0, norm_layer="frozen_bn", box_detections_per_img=3, shape_prior=str(codebook))
    checkpoint = tmp_path / "model_0.pth"
    save_checkpoint({"model": build_model(cfg).state_dict(), "model_config": cfg.to_dict(), "epoch": 0,
                     "label_names": {1: "chromosome"}, "label_to_cat_id": {1: 1}}, checkpoint)
    codebook.unlink()

    rc, _, _ = run_main(capsys, "--weights-path", checkpoint, "--data-path", tiny_coco, "--split", "val",
                        "--output-dir", tmp_path / "val", "--device", "cpu", "-j", "0")
    assert rc == 0
    record = json.loads((tmp_path / "val" / "record_mAP.json").read_text())
    assert record["model"] == "dacseg" and record["num_images"] == 2 and record["num_detections"] == 6
    assert predict.main(["--weights-path", str(checkpoint), str(tiny_coco / "images" / "val_001.png"),
                         "--output-dir", str(tmp_path / "pred"), "--device", "cpu", "--score-thresh", "0.0"]) == 0
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(results) == 3 and all(0 <= r["overlap_score"] <= 1 for r in results)
