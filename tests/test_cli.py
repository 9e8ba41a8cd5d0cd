"""train_utils.cli: every script's parser (reference defaults, real switches, one-line errors, ranges checked), the
model config the flags describe, and INPUT expansion."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from PIL import Image

from network_files.config import ModelConfig
from train_utils.cli import (
    ArgumentParser,
    UserError,
    add_data_args,
    add_device_args,
    add_threshold_args,
    expand_inputs,
    get_args_parser,
    model_config_from_args,
    parse_args,
)

DATA = ["--data-path", "D"]


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, prog="train.py")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no usage block
    assert err.startswith("train.py: error: ")
    return err


def test_defaults_are_the_reference_setup():
    args = parse_args(DATA)
    assert (args.opt, args.lr, args.momentum, args.weight_decay) == ("sgd", None, 0.9, 1e-4)  # None: 0.02 per 4
    assert (args.batch_size, args.epochs, args.lr_scheduler) == (4, 121, "cosine")
    assert (args.warmup_iters, args.warmup_factor, args.clip_grad_norm) == (None, 1e-3, 10.0)  # None: 300 or less
    assert args.accumulate_steps == 1 and args.rois_per_image == 512
    assert args.data_augmentation == "flip"
    assert args.model is None and args.num_classes is None  # None: maskrcnn, or the checkpoint's on --resume
    assert model_config_from_args(args).name == "maskrcnn"
    assert args.pretrained is None and args.pretrained_backbone is None  # from scratch unless weights are given
    assert args.trainable_backbone_layers is None and args.norm_layer is None  # resolve_config decides
    assert args.amp is None and args.amp_dtype == "float16"  # None: on for CUDA, off on the CPU
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert args.output_dir == "./save_weights" and args.keep_last == 3
    assert args.test_only is False and args.sync_bn is False and args.resume is None


def test_every_option_has_a_help_phrase():
    for action in get_args_parser()._actions:
        assert action.help and len(action.help) > 8, action.option_strings


def test_booleans_are_real_switches(capsys):
    assert parse_args(DATA + ["--amp", "--test-only", "--resume", "x.pth", "--sync-bn"]).amp is True
    assert parse_args(DATA + ["--no-amp"]).amp is False
    for action in get_args_parser()._actions:
        if isinstance(action.default, bool):
            assert isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)), action.dest
    assert "False" in _error_line(capsys, DATA + ["--amp", "False"])  # no type=bool: "False" is not swallowed


def test_seed_flag_names():
    args = parse_args(DATA + ["-b", "2", "-j", "0", "--wd", "0.5", "--lr-steps", "3", "5", "--epochs", "7",
                              "--weight-decay", "0.25"])
    assert (args.batch_size, args.workers, args.weight_decay, args.lr_steps, args.epochs) == (2, 0, 0.25, [3, 5], 7)


@pytest.mark.parametrize("argv, culprit", [
    (DATA + ["--bogus"], "--bogus"),
    (DATA + ["-b", "zero"], "zero"),
    (DATA + ["-b", "0"], "-b"),
    (DATA + ["--lr", "nan"], "nan"),
    (DATA + ["--model", "unet"], "unet"),
    (DATA + ["--loss-weights", "loss_mask"], "name=value"),
    (DATA + ["--loss-weights", "loss_nope=1"], "loss_nope"),
    (DATA + ["--loss-weights", "loss_mask=-1"], "-1"),
    (DATA + ["--min-size", "800", "--max-size", "400"], "--max-size"),
    (DATA + ["--test-only"], "--test-only"),
    (DATA + ["--trainable-backbone-layers", "6"], "6"),
    (DATA + ["--score-thresh", "1.5"], "1.5"),
    (DATA + ["--lr-scheduler", "multistep", "--lr-steps", "9", "3"], "--lr-steps"),
    (DATA + ["--save-every", "0"], "--save-every"),
    (DATA + ["--stain", "sometimes"], "sometimes"),
    (DATA + ["--accumulate-steps", "0"], "--accumulate-steps"),
    (DATA + ["--tensorboard-dir", "tb"], "argument --tensorboard-dir: goes with --tensorboard"),
])
def test_bad_flags_give_one_line(capsys, argv, culprit):
    assert culprit in _error_line(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_gpu_is_one_line(capsys):
    assert "no CUDA GPU" in _error_line(capsys, DATA + ["--device", "cuda"])


def test_loss_weights_collect_into_a_dict():
    args = parse_args(DATA + ["--loss-weights", "loss_mask=2", "loss_overlap=0.5", "--loss-weights", "loss_mask=3"])
    assert args.loss_weights == {"loss_mask": 3.0, "loss_overlap": 0.5}


def test_model_config_from_args():
    args = parse_args(DATA + ["--model", "dacseg", "--backbone", "resnet101", "--trainable-backbone-layers", "2",
                              "--norm-layer", "frozen_bn", "--min-size", "256", "--max-size", "320",
                              "--anchor-sizes", "8", "16", "32", "64", "128", "--box-score-thresh", "0.1",
                              "--box-nms-thresh", "0.4", "--detections-per-img", "60", "--overlap-cls-head", "conv",
                              "--min-overlap-area", "30", "--loss-weights", "loss_overlap=2", "--fusion", "gated",
                              "--crossing-mask-weight", "2.5", "--shape-prior", "codebook.pt",
                              "--shape-prior-nearest", "3"])
    config = model_config_from_args(args, num_classes=3)
    assert config == ModelConfig(name="dacseg", num_classes=3, backbone="resnet101", trainable_layers=2,
                                 norm_layer="frozen_bn", min_size=256, max_size=320, anchor_sizes=(8, 16, 32, 64, 128),
                                 box_score_thresh=0.1, box_nms_thresh=0.4, box_detections_per_img=60,
                                 overlap_cls_head="conv", min_overlap_area=30.0, loss_weights={"loss_overlap": 2.0},
                                 fusion="gated", crossing_mask_weight=2.5, shape_prior="codebook.pt",
                                 shape_prior_nearest=3)
    plain = model_config_from_args(parse_args(DATA))
    assert plain.num_classes == 1 and plain.trainable_layers is None and plain.norm_layer is None


def test_model_config_from_args_turns_config_errors_into_user_errors():
    args = parse_args(DATA)
    args.backbone = "vgg"  # the parser's choices prevent this; callers building args by hand get one line
    with pytest.raises(UserError, match="vgg"):
        model_config_from_args(args)


def test_shared_pieces_for_validation_and_predict(capsys):
    parser = ArgumentParser(prog="validation.py")
    add_data_args(parser)
    add_device_args(parser)
    add_threshold_args(parser)
    args = parser.parse_args(["--data-path", "D", "--score-thresh", "0.3"])
    assert (args.data_path, args.score_thresh, args.mask_thresh) == ("D", 0.3, 0.5)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert capsys.readouterr().err.splitlines() == [
        "validation.py: error: the following arguments are required: --data-path"]


def touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 6), 100).save(path, format="PNG")
    return path


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
    with pytest.raises(UserError, match=r"'.*missing\.png' matches no file or folder"):
        expand_inputs([str(tmp_path / "missing.png")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(UserError, match=r"folder .*empty holds no images"):
        expand_inputs([empty])
    with pytest.raises(UserError, match=r"matches 1 path\(s\) but no images"):
        expand_inputs([str(empty / "*.md")])


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(["train.py", "train_multi_GPU.py", "validation.py", "predict.py"] + [
    str(path.relative_to(ROOT)) for folder in ("tools", "bench") for path in (ROOT / folder).glob("*.py")
    if "def main(" in path.read_text()])  # every command-line program, a new one included


def _script_parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    import importlib.util
    import sys

    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    for name in ("get_args_parser", "get_validation_parser", "get_predict_parser"):
        if hasattr(module, name):
            return getattr(module, name)()
    raise AssertionError(f"{script} has no parser function")


def test_the_scripts_are_all_there():
    assert {"tools/export.py", "tools/synth_metaphase.py", "bench/bench_infer.py", "bench/bench_accuracy.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_parser_is_built_from_cli(script, monkeypatch):
    """One parser module: every script's parser is ``cli.ArgumentParser`` (one-line errors), and no option takes a
    bare int, float or bool, so every number is range-checked by ``number_arg`` and every switch is a real one."""
    parser = _script_parser(script, monkeypatch)
    assert isinstance(parser, ArgumentParser), script
    bare = [action.option_strings or [action.dest] for action in parser._actions
            if action.type in (int, float, bool)]
    assert bare == [], f"{script}: {bare} take a bare type"
