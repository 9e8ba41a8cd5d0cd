"""bench/bench_accuracy.py's pieces that need no training: presets, the crop transform it trains on, the table and
the ratios it prints."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from my_dataset_chromosome import ChromosomeDataset
from transforms import get_transform

_SPEC = importlib.util.spec_from_file_location("bench_accuracy", Path(__file__).resolve().parents[1] / "bench" /
                                               "bench_accuracy.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_accuracy"] = bench  # dataclasses look their module up
_SPEC.loader.exec_module(bench)


def _record(ap: float, overlap_recall: float) -> dict:
    return {"segm": {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2}, "precision": 0.5, "recall": 0.6, "f1": 0.55,
            "overlap_segm": {"AP": ap / 4, "recall": overlap_recall}, "count_mae": 3.0}


def test_table_has_a_row_per_model_with_the_seed_spread_and_ratios():
    outcomes = [bench.Outcome("stock", 0, 10, 5.0, 2.0, _record(0.2, 0.4), 9.0),
                bench.Outcome("stock", 1, 10, 5.0, 2.0, _record(0.3, 0.4), 9.0),
                bench.Outcome("maskrcnn", 0, 10, 5.0, 4.0, _record(0.25, 0.5), 9.0),
                bench.Outcome("maskrcnn", 1, 10, 5.0, 4.0, _record(0.25, 0.5), 9.0)]
    table = bench.format_table(outcomes).splitlines()
    assert table[0].startswith("| model | seeds | steps | AP | AP50 |") and len(table) == 4
    assert table[2].startswith("| stock | 0,1 | 10 | 0.250 ±0.050 | 0.500 ±0.100 |")
    assert table[3].startswith("| maskrcnn | 0,1 | 10 | 0.250 ±0.000 |")
    ratios = bench.format_ratios(outcomes)
    assert ratios == "ratio maskrcnn / stock: AP 1.000  AP50 1.000  ovl AP 1.000  ovl R 1.250  img/s 2.000"


def test_presets_fit_their_hardware_budget():
    cpu, gpu = bench.PRESETS["cpu"], bench.PRESETS["gpu"]
    assert cpu.budget_iters and cpu.crop_size and not cpu.amp
    assert gpu.budget_s and 3 * gpu.budget_s <= 9 * 60 * 0.8 and gpu.amp and gpu.batch_size == 4
    assert gpu.warmup_iters == 300 and gpu.min_size == 800  # the reference recipe


def test_ablation_flags_override_the_preset_and_bad_ones_are_one_line(capsys):
    args = bench.get_args_parser().parse_args(["--overlap-cls-head", "fc", "--loss-weights", "loss_overlap=0.25",
                                               "loss_mask=2", "--budget-iters", "20"])
    preset = bench.preset_from_args(args)
    assert preset.overlap_cls_head == "fc" and preset.budget_iters == 20
    assert preset.loss_weights == (("loss_mask", 2.0), ("loss_overlap", 0.25))
    assert bench.preset_from_args(bench.get_args_parser().parse_args([])) == bench.PRESETS["cpu"]
    with pytest.raises(SystemExit):
        bench.get_args_parser().parse_args(["--loss-weights", "loss_nope=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown loss 'loss_nope'" in err[0]


def test_the_preset_loss_weights_reach_the_training_loop(tiny_coco, monkeypatch):
    seen = {}
    monkeypatch.setattr(bench.loop, "train_one_epoch", lambda *args, **kwargs: seen.update(kwargs))
    preset = dataclasses.replace(bench.PRESETS["cpu"], budget_iters=1, loss_weights=(("loss_overlap", 0.25),))
    dataset = ChromosomeDataset(tiny_coco, "train")
    bench.train_model(torch.nn.Linear(1, 1), preset, dataset, torch.device("cpu"), seed=0, workers=0)
    assert seen["loss_weights"] == {"loss_overlap": 0.25} and seen["clip_grad_norm"] == 10.0


def test_crops_keep_whole_masks_and_tight_boxes(tiny_coco):
    torch.manual_seed(0)
    dataset = ChromosomeDataset(tiny_coco, "train", transforms=get_transform("flip", train=True, crop_size=96))
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape[-2:] == (96, 96) and target["masks"].shape[-2:] == (96, 96)
        masks = target["masks"].bool()
        assert masks.flatten(1).any(1).all()  # instances cut away entirely are dropped
        for mask, box in zip(masks, target["boxes"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        assert len(target["labels"]) == len(masks) == len(target["boxes"])


def test_prepare_data_refuses_a_folder_without_splits(tmp_path):
    with pytest.raises(SystemExit, match="need train/ and val/"):
        bench.prepare_data(tmp_path, tmp_path / "work")


def test_dacseg_shape_needs_an_existing_codebook_and_says_so_in_one_line(tmp_path):
    for argv, says in ((["--models", "dacseg", "dacseg_shape"], "dacseg_shape needs --shape-codebook PT"),
                       (["--models", "dacseg_shape", "--shape-codebook", str(tmp_path / "gone.pt")],
                        f"--shape-codebook {tmp_path / 'gone.pt'}: no such file")):
        with pytest.raises(SystemExit, match=says) as error:
            bench.preset_from_args(bench.get_args_parser().parse_args(argv))
        assert "\n" not in str(error.value)
    with pytest.raises(SystemExit, match="needs --shape-codebook"):
        bench.make_model("dacseg_shape", bench.PRESETS["cpu"], 1)
    assert "dacseg_shape" not in bench.get_args_parser().parse_args([]).models


@pytest.mark.parametrize("name", ["stock", "dacseg", "dacseg_shape"])
def test_trained_models_are_saved_as_checkpoints_predict_can_read(name, tiny_coco, tmp_path):
    from tests.test_shape_prior import write_codebook
    from train_utils.engine.checkpoint import load_model_from_checkpoint

    codebook = str(write_codebook(tmp_path / "codebook.pt")) if name == "dacseg_shape" else None
    preset = bench.Preset(batch_size=1, lr=0.01, budget_iters=1, budget_s=None, warmup_iters=1, min_size=128,
                          max_size=160, rois_per_image=16, shape_codebook=codebook)
    val = ChromosomeDataset(tiny_coco, "val")
    torch.manual_seed(0)
    model = bench.make_model(name, preset, val.num_classes)
    path = bench.save_trained(model, name, 3, bench.new_training(model, preset, torch.device("cpu"), 1), preset, val,
                              tmp_path)
    loaded, config, checkpoint = load_model_from_checkpoint(path)
    assert path.name == f"{name}_seed3.pth"
    assert config.name == {"stock": "maskrcnn", "dacseg_shape": "dacseg"}.get(name, name)
    assert (config.shape_prior is not None) == (name == "dacseg_shape")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert checkpoint["label_to_cat_id"] == val.label_to_cat_id and (config.min_size, config.max_size) == (128, 160)
    # the engine's writer: a train.py checkpoint, optimizer and schedule states included
    assert list(checkpoint) == ["model", "optimizer", "lr_scheduler", "lr_schedule", "scaler", "epoch", "args",
                                "model_config", "label_names", "label_to_cat_id", "rng_state", "best_segm_ap", "stain"]
    assert checkpoint["args"]["seed"] == 3 and checkpoint["args"]["opt"] == "sgd"


def test_training_crops_are_resized_by_the_factor_the_model_gives_whole_images(tiny_coco):
    dataset = ChromosomeDataset(tiny_coco, "train")  # 160x128 images
    native = dataclasses.replace(bench.PRESETS["cpu"], min_size=128, max_size=160, crop_size=96)
    enlarged = dataclasses.replace(native, min_size=192, max_size=1333)
    capped = dataclasses.replace(native, min_size=192, max_size=200)  # the longer side stops it at 200 / 160
    assert bench.model_scale(native, dataset) == 1.0
    assert bench.model_scale(enlarged, dataset) == 1.5 and bench.model_scale(capped, dataset) == 1.25
    torch.manual_seed(0)
    dataset.transforms = bench.train_transform(native, 1.0)  # the native preset: the crop as it was
    assert dataset[0][0].shape[-2:] == (96, 96)
    dataset.transforms = bench.train_transform(enlarged, 1.5)
    image, target = dataset[0]
    assert image.shape[-2:] == (144, 144) and target["masks"].shape[-2:] == (144, 144)
    assert len(target["boxes"]) == len(target["masks"]) > 0
    for mask, box in zip(target["masks"].bool(), target["boxes"]):  # boxes tight around the resized masks
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_the_model_scale_is_the_median_of_each_images_factor():
    sizes = {1: (100, 200), 2: (150, 150), 3: (120, 130)}  # (short, long) factors at 192, 200: 1.0, 1.28, 1.54
    dataset = SimpleNamespace(ids=list(sizes), coco=SimpleNamespace(
        imgs={i: {"height": short, "width": long} for i, (short, long) in sizes.items()}))
    preset = dataclasses.replace(bench.PRESETS["cpu"], min_size=192, max_size=200)
    assert bench.model_scale(preset, dataset) == 1.28  # not the factor of the median sides (1.333)


def test_size_flags_override_the_preset():
    preset = bench.preset_from_args(bench.get_args_parser().parse_args(["--min-size", "800", "--max-size", "1333"]))
    assert (preset.min_size, preset.max_size) == (800, 1333) and preset.crop_size == bench.PRESETS["cpu"].crop_size
