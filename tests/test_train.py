"""End to end: train.py on the tiny set (in-process), its output files and formats, exact resume, --test-only,
a non-finite loss, and one-line errors."""
from __future__ import annotations

import functools
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision.models.detection.roi_heads as tv_roi_heads
from PIL import Image

import train
from train_utils.engine import schedule
from train_utils.evaluation import score
from train_utils.engine.checkpoint import load_checkpoint
from train_utils.outputs.results import parse_epoch_line, read_jsonl

REPO = Path(__file__).resolve().parents[1]
LINE_RE = re.compile(r"^epoch:\d+ (-?\d+\.\d{4}  ){13}\d+\.\d{6}$")
LOSS_TERMS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def tiny_args(data: Path, out: Path, *extra: str, seed: bool = True) -> list[str]:
    return ["--data-path", str(data), "--output-dir", str(out), "--device", "cpu", "--workers", "0", "-b", "2",
            "--backbone", "resnet18", "--min-size", "128", "--max-size", "160", "--trainable-backbone-layers", "0",
            "--lr", "0.002",
            "--clip-grad-norm", "10", *(["--seed", "0"] if seed else []), *extra]


@pytest.fixture(scope="module")
def run_two_epochs(tiny_coco, tmp_path_factory):
    """An uninterrupted 2-epoch run, shared by the tests below."""
    out = tmp_path_factory.mktemp("train") / "run"
    assert train.main(tiny_args(tiny_coco, out, "--epochs", "2", "--keep-last", "2")) == 0
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_result_files_have_the_seeds_format(run_two_epochs):
    for name in ("det_results.txt", "seg_results.txt"):
        lines = _lines(run_two_epochs / name)
        assert [parse_epoch_line(line)[0] for line in lines] == [0, 1]
        assert all(LINE_RE.match(line) for line in lines), lines
    records = read_jsonl(run_two_epochs / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    seg = [parse_epoch_line(line)[1] for line in _lines(run_two_epochs / "seg_results.txt")]
    det = [parse_epoch_line(line)[1] for line in _lines(run_two_epochs / "det_results.txt")]
    for record, seg_numbers, det_numbers in zip(records, seg, det):
        for key in ("loss", *LOSS_TERMS, "lr", "images_per_s", "epoch_time_s", "eval_time_s", "precision",
                    "recall", "f1", "count_mae", "count_exact"):
            assert isinstance(record[key], float), key
        assert seg_numbers[:12] == [round(v, 4) for v in record["segm"]["stats"]]
        assert det_numbers[:12] == [round(v, 4) for v in record["bbox"]["stats"]]
        assert seg_numbers[12] == det_numbers[12] == round(record["loss"], 4)
        assert seg_numbers[13] == round(record["lr"], 6)
        assert record["loss"] == pytest.approx(sum(record[k] for k in LOSS_TERMS))
        assert {"AP", "AP50", "recall"} <= set(record["overlap_segm"]) and "summary_lines" not in record["segm"]
    # per-step schedule over 2 epochs of 2 steps, warmup 2 steps (half the run); each line has its last step's lr
    factor = functools.partial(schedule.lr_factor, total_steps=4, steps_per_epoch=2, warmup_iters=2)
    assert [r["lr"] for r in records] == pytest.approx([0.002 * factor(1), 0.002 * factor(3)])
    assert [r["optimizer_steps"] for r in records] == [2, 2]


def test_side_files(run_two_epochs):
    args = json.loads((run_two_epochs / "args.json").read_text())
    assert args["seed"] == 0 and args["epochs"] == 2 and args["world_size"] == 1
    assert args["min_overlap_area"] == 20.0 and args["model"] == "maskrcnn"  # what ran: the rule's default threshold
    assert args["stain"] == "auto" and args["stain_polarity"] == "bright-on-dark"  # bright bars on a dark field
    assert args["stain_counts"] == {"bright-on-dark": 4, "dark-on-bright": 0}
    assert load_checkpoint(run_two_epochs / "model_1.pth")["stain"] == {
        "polarity": "bright-on-dark", "train_counts": {"bright-on-dark": 4, "dark-on-bright": 0}}
    assert json.loads((run_two_epochs / "labels.json").read_text()) == {"1": "chromosome"}
    for name in ("loss_and_lr.png", "mAP.png"):
        with Image.open(run_two_epochs / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert not list(run_two_epochs.glob("*.tmp"))


def test_checkpoints(run_two_epochs):
    assert sorted(p.name for p in run_two_epochs.glob("*.pth")) == ["best.pth", "model_0.pth", "model_1.pth"]
    ckpt = load_checkpoint(run_two_epochs / "model_1.pth")  # weights_only=True
    assert set(ckpt) >= {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "args", "model_config",
                         "label_names", "label_to_cat_id", "rng_state", "best_segm_ap"}
    assert ckpt["epoch"] == 1 and ckpt["scaler"] is None
    assert ckpt["model_config"]["trainable_layers"] == 0 and ckpt["model_config"]["norm_layer"] == "bn"
    assert ckpt["label_names"] == {1: "chromosome"} and ckpt["label_to_cat_id"] == {1: 1}
    seg_ap = [parse_epoch_line(line)[1][0] for line in _lines(run_two_epochs / "seg_results.txt")]
    best = load_checkpoint(run_two_epochs / "best.pth")
    assert best["epoch"] == seg_ap.index(max(seg_ap))
    assert round(ckpt["best_segm_ap"], 4) == max(seg_ap)


def test_resume_repeats_the_uninterrupted_run(run_two_epochs, tiny_coco, tmp_path):
    """Resume after epoch 0 into a folder holding epoch 0's lines: epoch 1 equals the uninterrupted run's, epoch 0
    is not written twice, and --keep-last 1 prunes model_0."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(run_two_epochs / "model_0.pth", out / "model_0.pth")
    for name in ("det_results.txt", "seg_results.txt"):
        (out / name).write_text(_lines(run_two_epochs / name)[0] + "\n")
    argv = tiny_args(tiny_coco, out, "--epochs", "2", "--keep-last", "1", "--resume", str(out / "model_0.pth"),
                     seed=False)  # the seed comes from the checkpoint
    assert train.main(argv) == 0
    for name in ("det_results.txt", "seg_results.txt"):
        assert _lines(out / name) == _lines(run_two_epochs / name)
    resumed = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == [1]
    uninterrupted = read_jsonl(run_two_epochs / "metrics.jsonl")[1]
    for key in ("loss", *LOSS_TERMS, "lr"):
        assert resumed[0][key] == uninterrupted[key], key
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_1.pth"]


@pytest.mark.parametrize("flag, expected", [
    (["--model", "dacseg"], "--model dacseg but "),
    (["--loss-weights", "loss_mask=2"], "--loss-weights {'loss_mask': 2.0} but "),
    (["--min-overlap-area", "30"], "--min-overlap-area 30 but "),
])
def test_resume_refuses_model_flags_that_contradict_the_checkpoint(run_two_epochs, tiny_coco, tmp_path, capsys,
                                                                  flag, expected):
    argv = tiny_args(tiny_coco, tmp_path / "out", "--epochs", "3", "--resume", str(run_two_epochs / "model_1.pth"),
                     *flag)
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: " + expected), err


def test_resume_honours_a_new_lr_and_says_so(run_two_epochs, tiny_coco, tmp_path, capsys):
    out = tmp_path / "new_lr"
    argv = tiny_args(tiny_coco, out, "--epochs", "2", "--resume", str(run_two_epochs / "model_0.pth"), seed=False)
    argv[argv.index("--lr") + 1] = "0.004"
    assert train.main(argv) == 0
    assert "resuming with base lr 0.004 instead of the checkpoint's 0.002" in capsys.readouterr().out
    factor = functools.partial(schedule.lr_factor, total_steps=4, steps_per_epoch=2, warmup_iters=2)
    assert read_jsonl(out / "metrics.jsonl")[0]["lr"] == pytest.approx(0.004 * factor(3))
    assert json.loads((out / "args.json").read_text())["lr"] == 0.004


def test_default_lr_scales_with_the_total_batch_and_accumulation(tiny_coco, tmp_path, capsys):
    """-b 1 with 2 accumulated batches: lr 0.02 x 2 / 4, said once; 4 images make 2 optimizer steps an epoch."""
    out = tmp_path / "accumulate"
    argv = tiny_args(tiny_coco, out, "--epochs", "1", "--accumulate-steps", "2")
    del argv[argv.index("--lr"):argv.index("--lr") + 2]
    argv[argv.index("-b") + 1] = "1"
    assert train.main(argv) == 0
    said = capsys.readouterr().out
    assert said.count("lr 0.01: 0.02 per 4 images scaled to a total batch of 2 (1 process(es) x -b 1 x "
                      "--accumulate-steps 2)") == 1
    record = read_jsonl(out / "metrics.jsonl")[0]
    assert record["optimizer_steps"] == 2
    args = json.loads((out / "args.json").read_text())
    assert args["lr"] == 0.01 and args["warmup_iters"] == 1 and args["clip_grad_norm"] == 10.0


def test_accumulation_beyond_an_epoch_is_clamped_and_the_lr_follows_the_batch_that_runs(tiny_coco, tmp_path,
                                                                                         monkeypatch, capsys):
    """-b 2 --accumulate-steps 50 on 4 images: the lr was scaled to 100 images while each optimizer step summed the
    epoch's 4 (a group never spans epochs), and the loss diverged (14.9, 14.6, 1236.6). The lr must be the one for
    the images a step really sums, and the warmup half of the optimizer steps the run really has."""
    from train_utils.engine import loop

    class Stop(Exception):
        pass

    seen = {}

    def first_epoch(model, optimizer, data_loader, device, epoch, *, accumulate_steps, **kwargs):
        group = list(itertools.islice(iter(data_loader), accumulate_steps))
        seen.update(images_per_step=sum(len(images) for images, _ in group), lr=optimizer.param_groups[0]["initial_lr"])
        raise Stop

    monkeypatch.setattr(loop, "train_one_epoch", first_epoch)
    out = tmp_path / "accumulate"
    argv = tiny_args(tiny_coco, out, "--epochs", "4", "--accumulate-steps", "50")
    del argv[argv.index("--lr"):argv.index("--lr") + 2]
    with pytest.raises(Stop):
        train.main(argv)
    assert seen == {"images_per_step": 4, "lr": schedule.scaled_lr(4)}
    said = capsys.readouterr().out
    assert "note: --accumulate-steps 50 is more than the 2 batch(es) an epoch has" in said
    assert "scaled to a total batch of 4 (1 process(es) x -b 2 x --accumulate-steps 2)" in said
    args = json.loads((out / "args.json").read_text())
    assert (args["accumulate_steps"], args["lr"]) == (2, 0.02)
    assert args["warmup_iters"] == schedule.default_warmup_iters(4) == 2  # 4 epochs of one optimizer step


def test_test_only_evaluates_a_checkpoint(run_two_epochs, tiny_coco, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = tiny_args(tiny_coco, out, "--test-only", "--resume", str(run_two_epochs / "model_1.pth"))
    assert train.main(argv) == 0
    record = json.loads((out / "record_mAP.json").read_text())
    seg_line = parse_epoch_line(_lines(run_two_epochs / "seg_results.txt")[1])[1]
    assert [round(v, 4) for v in record["segm"]["stats"]] == seg_line[:12]
    assert (out / "record_mAP.txt").is_file() and not list(out.glob("*.pth"))
    assert "record written to" in capsys.readouterr().out


def test_non_finite_loss_stops_and_keeps_the_checkpoint(run_two_epochs, tiny_coco, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    out.mkdir()
    shutil.copy(run_two_epochs / "model_0.pth", out / "model_0.pth")
    before = (out / "model_0.pth").stat()
    real_loss = tv_roi_heads.maskrcnn_loss
    monkeypatch.setattr(tv_roi_heads, "maskrcnn_loss", lambda *a: real_loss(*a) * float("nan"))
    argv = tiny_args(tiny_coco, out, "--epochs", "2", "--resume", str(out / "model_0.pth"))
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: non-finite loss at epoch 1, iteration 0")
    assert "loss_mask=nan" in err[0] and "loss_classifier=" in err[0]
    after = (out / "model_0.pth").stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".pth", ".txt", ".jsonl")) == ["model_0.pth"]


@pytest.mark.parametrize("setup, expected", [
    ("missing", "no such directory"),
    ("empty", "instances_val.json"),
    ("classes", "--num-classes 3"),
    ("checkpoint", "checkpoint not found"),
    ("weights", "loss_overlap"),  # a DaCSeg term weighted in a plain Mask R-CNN: say so, don't ignore it
    ("no_annotations", "no annotated instances to train on"),
    ("output_file", "is a file, not a folder"),
])
def test_user_errors_are_one_line(tiny_coco, tmp_path, capsys, setup, expected):
    data, extra = tiny_coco, []
    if setup == "missing":
        data = tmp_path / "nowhere"
    elif setup == "empty":
        data = tmp_path
    elif setup == "classes":
        extra = ["--num-classes", "3"]
    elif setup == "weights":
        extra = ["--loss-weights", "loss_overlap=2"]
    elif setup == "output_file":
        (tmp_path / "out").write_text("not a folder")
    elif setup == "no_annotations":
        data = tmp_path / "data"
        shutil.copytree(tiny_coco, data)
        doc = json.loads((data / "annotations" / "instances_train.json").read_text())
        del doc["annotations"]
        (data / "annotations" / "instances_train.json").write_text(json.dumps(doc))
    else:
        extra = ["--resume", str(tmp_path / "none.pth")]
    assert train.main(tiny_args(data, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "out").is_dir()


@pytest.mark.parametrize("split, workers", [("train", "1"), ("val", "0")])
def test_a_broken_image_is_one_line_under_loader_workers(tiny_coco, tmp_path, capsys, split, workers):
    """A truncated train image is found by a DataLoader worker (torch wraps its error in the worker's traceback);
    a val image that is not an image is found by the check before the first step."""
    data = tmp_path / "data"
    shutil.copytree(tiny_coco, data)
    broken = data / "images" / f"{split}_001.png"
    if split == "train":
        broken.write_bytes(broken.read_bytes()[:120])  # the header survives, the pixels do not
    else:
        broken.write_text("not a picture")
    argv = tiny_args(data, tmp_path / "out", "--epochs", "1")
    argv[argv.index("--workers") + 1] = workers
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot read image {broken}"), err
    assert "Traceback" not in err and "worker" not in err
    assert not list((tmp_path / "out").glob("*.pth"))


def test_script_help_and_bad_flag():
    def start(*argv):
        return subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    helping, failing = start("--help"), start("--data-path", "D", "--epochs", "two")  # side by side: faster
    out, _ = helping.communicate(timeout=120)
    assert helping.returncode == 0 and "--data-path" in out and "--loss-weights" in out
    out, err = failing.communicate(timeout=120)
    assert failing.returncode == 2 and out == ""
    assert err.splitlines() == ["train.py: error: argument --epochs: 'two' is not an integer"]


def test_a_failure_during_evaluation_keeps_the_epoch_and_the_resume_evaluates_it(run_two_epochs, tiny_coco, tmp_path,
                                                                                monkeypatch, capsys):
    out = tmp_path / "out"
    evaluate = score.evaluate

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C, or anything else that stops the job, while evaluating

    monkeypatch.setattr(score, "evaluate", killed)
    assert train.main(tiny_args(tiny_coco, out, "--epochs", "2")) == 130  # run_two_epochs' run, stopped in epoch 0
    pending = load_checkpoint(out / "model_0.pth")["pending_eval"]
    assert pending["loss"] == read_jsonl(run_two_epochs / "metrics.jsonl")[0]["loss"]  # the epoch's training is kept
    assert not (out / "seg_results.txt").exists()

    monkeypatch.setattr(score, "evaluate", evaluate)
    capsys.readouterr()
    # --epochs 1: nothing is left to train, but the pending evaluation is done
    assert train.main(tiny_args(tiny_coco, out, "--epochs", "1", "--resume", str(out / "model_0.pth"))) == 0
    assert "evaluating epoch 0 first" in capsys.readouterr().out
    for name in ("det_results.txt", "seg_results.txt"):
        assert _lines(out / name) == _lines(run_two_epochs / name)[:1]
    assert load_checkpoint(out / "model_0.pth").get("pending_eval") is None and (out / "best.pth").is_file()


def test_resuming_with_another_optimizer_is_one_line(run_two_epochs, tiny_coco, tmp_path, capsys):
    ckpt = run_two_epochs / "model_1.pth"
    argv = tiny_args(tiny_coco, tmp_path / "out", "--epochs", "3", "--resume", str(ckpt), "--opt", "adamw")
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: --opt adamw but {ckpt} was trained with --opt sgd, whose state cannot drive "
                                "adamw; resume with --opt sgd (or start a new run)"]
