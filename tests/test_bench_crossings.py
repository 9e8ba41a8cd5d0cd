"""bench/bench_crossings.py and bench/crossings_report.py, without training: the variants build, the report's
tables and intervals on hand-made runs, the picture."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import bench_crossings as bench
from bench.crossings_report import picture, report
from tests.test_crossing_crops import two_crossing_bars_and_a_lone_one
from tools.crossing_crops import cut_crops


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    root = tmp_path_factory.mktemp("xcrops")
    two_crossing_bars_and_a_lone_one(root / "src")
    cut_crops(root / "src", "val", root / "crops", crop_size=100, margin=5)
    return root / "crops"


def write_runs(crops, runs_dir, found: dict[str, list[bool]]):
    """Runs whose detections are the ground-truth masks of the crossing crop's focus instances listed as found."""
    doc = json.loads((crops / "annotations" / "instances_val.json").read_text())
    runs_dir.mkdir()
    (runs_dir / bench.VAL_CROPS).write_text(json.dumps(doc))
    focus = [a for a in doc["annotations"] if a["focus"]]
    for name, per_seed in found.items():
        for seed, hit in enumerate(per_seed):
            dets = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"], "score": 0.9,
                     "bbox": a["bbox"]} for k, a in enumerate(focus) if hit or k % 2]
            run = bench.Run(name, seed, {}, steps=10, train_s=1.0, detections=dets)
            (runs_dir / f"{name}_seed{seed}.json").write_text(json.dumps(run.__dict__))


def test_report_has_every_variant_and_its_paired_difference(crops, tmp_path):
    write_runs(crops, tmp_path / "runs", {"maskrcnn": [False, False, False], "dacseg": [True, True, True]})
    text = report(tmp_path / "runs", draws=50)
    assert "val crops: 1 crossing (1 pairs), 1 control" in text
    dacseg_row = next(line for line in text.splitlines() if line.startswith("| dacseg | 0,1,2 | 10 |"))
    maskrcnn_row = next(line for line in text.splitlines() if line.startswith("| maskrcnn | 0,1,2 | 10 |"))
    assert "| 1.000 ±0.000 | 1.000 ±0.000 | 1.000 ±0.000 |" in dacseg_row  # pairs and recall: all found
    assert "| 0.000 ±0.000 |" in maskrcnn_row  # no pair separated: one arm always missing
    diff = next(line for line in text.splitlines() if line.startswith("| dacseg | +1.000"))
    assert "[+1.000, +1.000]" in diff  # one crop: every draw is that crop


def test_report_compares_with_each_baseline_asked(crops, tmp_path):
    write_runs(crops, tmp_path / "runs", {"maskrcnn": [False, False], "dacseg": [True, True]})
    text = report(tmp_path / "runs", draws=50, baselines=("maskrcnn", "dacseg"))
    against_dacseg = text[text.index("Differences from dacseg"):].splitlines()
    assert any(line.startswith("| maskrcnn | -1.000 [-1.000, -1.000]") for line in against_dacseg)
    assert "Differences from dacseg" not in report(tmp_path / "runs", draws=50)  # maskrcnn only, by default


def test_identical_runs_are_not_resolved(crops, tmp_path):
    write_runs(crops, tmp_path / "runs", {"maskrcnn": [True, False], "stock": [True, False]})
    row = next(line for line in report(tmp_path / "runs", draws=100).splitlines() if line.startswith("| stock | +0"))
    assert "not resolved" in row


def test_report_tables_the_overlap_classifier_of_the_variants_that_have_one(crops, tmp_path):
    write_runs(crops, tmp_path / "runs", {"maskrcnn": [True], "dacseg": [True]})
    focus = [a for a in json.loads((crops / "annotations" / "instances_val.json").read_text())["annotations"]
             if a["focus"]]  # the runs' detections: every one found
    path = tmp_path / "runs" / "dacseg_seed0.json"
    run = json.loads(path.read_text())
    for d in run["detections"]:  # every chromosome said crossing: right on the crossing ones, wrong on the others
        d["overlap_score"] = 0.9
    path.write_text(json.dumps(run))
    text = report(tmp_path / "runs", draws=50)
    table = text[text.index("Overlap classifier"):].splitlines()
    crossing = sum(a["overlapping"] for a in focus)
    assert crossing == 2 and len(focus) == 3
    assert "| dacseg | 2 | 1.000 | 0.900 | 1 | 0.000 | 0.900 |" in table
    assert not any(line.startswith("| maskrcnn |") for line in table)  # no classifier: no row


def test_report_tables_the_val_curve_over_the_seeds(crops, tmp_path):
    write_runs(crops, tmp_path / "runs", {"maskrcnn": [True, True]})
    for seed, late in ((0, 0.5), (1, 0.7)):
        path = tmp_path / "runs" / f"maskrcnn_seed{seed}.json"
        run = json.loads(path.read_text())
        run["curve"] = [(5, 0.1, 0.0), (10, late, 1.0)]
        path.write_text(json.dumps(run))
    table = report(tmp_path / "runs", draws=50)
    table = table[table.index("Val curve"):].splitlines()
    assert "| maskrcnn | 5 | 0.100 ±0.000 | 0.000 ±0.000 |" in table
    assert "| maskrcnn | 10 | 0.600 ±0.100 | 1.000 ±0.000 |" in table


def test_report_tables_where_the_found_crossing_masks_go_wrong(crops, tmp_path):
    write_runs(crops, tmp_path / "runs", {"maskrcnn": [True], "dacseg": [False]})  # exact masks: nothing wrong
    text = report(tmp_path / "runs", draws=50)
    table = text[text.index("Where the masks"):].splitlines()
    assert "| maskrcnn | 2 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 |" in table  # both arms found, exactly
    assert "| dacseg | 1 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 |" in table  # one arm missing: one found


def test_picture_draws_ground_truth_and_both_models(crops, tmp_path):
    write_runs(crops, tmp_path / "runs", {"maskrcnn": [False], "dacseg": [True]})
    out = picture(tmp_path / "runs", crops, tmp_path / "x.png", count=6)
    from PIL import Image  # noqa: PLC0415

    with Image.open(out) as img:
        assert img.width > 3 * 320 and img.height >= 320  # one crossing crop: one row of three panels


def test_picture_draws_the_variants_asked_for_and_names_one_without_a_run(crops, tmp_path):
    write_runs(crops, tmp_path / "runs", {"maskrcnn": [False], "dacseg": [True], "dacseg_neighbour4": [True]})
    from PIL import Image  # noqa: PLC0415

    two = picture(tmp_path / "runs", crops, tmp_path / "two.png", variants=("maskrcnn", "dacseg"))
    three = picture(tmp_path / "runs", crops, tmp_path / "three.png",
                    variants=("maskrcnn", "dacseg", "dacseg_neighbour4"))
    with Image.open(two) as a, Image.open(three) as b:
        assert b.width > a.width and b.height == a.height  # one more panel in the row
    with pytest.raises(SystemExit, match="no seed-0 run of dacseg_fc in"):
        picture(tmp_path / "runs", crops, tmp_path / "x.png", variants=("maskrcnn", "dacseg_fc"))


@pytest.mark.parametrize("name", ["stock", "maskrcnn_mask14", "dacseg_gated"])
def test_variants_build_at_the_crops_scale(name):
    torch.manual_seed(0)
    setting = bench.Setting(crop_size=96)
    model = bench.make_model(bench.VARIANTS[name], setting, num_classes=1).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 96)])[0]
    assert out["masks"].shape[-2:] == (96, 96)
    expected = 7 if name == "maskrcnn_mask14" else 14
    assert model.roi_heads.mask_roi_pool.output_size == (expected, expected)


def test_every_variant_has_a_valid_config_with_its_options():
    for name, variant in bench.VARIANTS.items():
        # as its checkpoint records it
        config = bench.model_config(variant, bench.Setting(), 1, 576, 768, codebook=Path("codebook.pt"))
        assert config.name == ("maskrcnn" if variant.model == "stock" else variant.model)
        assert config.shape_prior == ("codebook.pt" if variant.shape_prior else None), name
        for key, value in variant.config:
            assert getattr(config, key) == value, name
        assert (config.min_size, config.max_size, config.backbone) == (576, 768, "resnet18")


def test_seeded_batches_depend_on_seed_and_pass_only():
    a, b = bench.SeededBatches(10, 4, seed=3), bench.SeededBatches(10, 4, seed=3)
    assert [t.tolist() for t in a] == [t.tolist() for t in b] and len(a) == 3
    b.set_epoch(1)
    assert [t.tolist() for t in a] != [t.tolist() for t in b]
    assert sorted(np.concatenate([t.numpy() for t in a]).tolist()) == list(range(10))


def test_the_null_calibration_trains_ours_from_other_seeds_paired_as_its_own():
    again, ours = bench.VARIANTS["maskrcnn_reseeded"], bench.VARIANTS["maskrcnn"]
    assert dataclasses.replace(again, seed_offset=0, note="") == dataclasses.replace(ours, note="")  # same config
    assert [bench.training_seed(again, s) for s in (0, 1, 2)] == [100, 101, 102]
    assert [bench.training_seed(ours, s) for s in (0, 1, 2)] == [0, 1, 2]


def test_an_out_folder_with_runs_of_another_setting_is_refused(tmp_path):
    setting = bench.Setting(crop_size=128, steps=300)
    stored = bench.as_json(setting)
    del stored["device"]  # a run saved before the device was part of the setting: the CPU's
    assert bench.setting_differences(stored, setting) == []
    (tmp_path / "maskrcnn_seed0.json").write_text(json.dumps({"setting": stored}))
    bench.check_out(tmp_path, setting)  # the same setting: kept, and resumed
    with pytest.raises(SystemExit, match=r"maskrcnn_seed0.json: steps 300 there, 600 here\); give another --out"):
        bench.check_out(tmp_path, bench.Setting(crop_size=128, steps=600))
    with pytest.raises(SystemExit, match="device cpu there, cuda here"):
        bench.check_out(tmp_path, bench.Setting(crop_size=128, steps=300, device="cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA device here"):
        bench.main(["--device", "cuda", "--out", str(tmp_path / "runs")])


def test_gzipped_runs_without_their_ground_truth_report_as_the_plain_ones(crops, tmp_path, capsys):
    """Runs kept gzipped (bench/results/) with the crops' ground truth elsewhere (it is BioImLab's, never kept in
    the repository): the same tables; a folder with no runs is one line."""
    import gzip

    write_runs(crops, tmp_path / "runs", {"maskrcnn": [False, True], "dacseg": [True, True]})
    packed = tmp_path / "packed"
    packed.mkdir()
    for path in (tmp_path / "runs").glob("*_seed*.json"):
        (packed / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
    gt = tmp_path / "runs" / bench.VAL_CROPS
    assert report(packed, draws=50, gt=gt) == report(tmp_path / "runs", draws=50)
    assert bench.saved_crop_size(packed) is None  # these hand-made runs record no setting
    with pytest.raises(SystemExit, match=f"--report {tmp_path / 'empty'}: no saved runs"):
        bench.main(["--report", str(tmp_path / "empty")])


def test_saved_crop_size_is_the_runs_own_or_none(tmp_path):
    assert bench.saved_crop_size(tmp_path) is None  # no runs: --crop-size decides
    (tmp_path / "maskrcnn_seed0.json").write_text(json.dumps({"setting": {}}))  # a run that does not record it
    assert bench.saved_crop_size(tmp_path) is None
    (tmp_path / "maskrcnn_seed1.json").write_text(json.dumps({"setting": bench.as_json(bench.Setting(crop_size=160))}))
    assert bench.saved_crop_size(tmp_path) == 160
