"""--tensorboard: the loss terms, lr and validation record read back from the event files, and one line without
the package or where the log folder cannot be."""
from __future__ import annotations

import shutil
import sys

import pytest
from test_train import tiny_args

import train
from train_utils.outputs.tensorboard import record_scalars

LOSS_TERMS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def one_epoch(tiny_coco, tmp_path_factory):
    """A one-epoch run with --tensorboard, shared by the tests below (copy it before writing into it)."""
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tensorboard") / "run"
    assert train.main(tiny_args(tiny_coco, out, "--epochs", "1", "--tensorboard", "--print-freq", "1")) == 0
    return out


def test_a_run_writes_loss_terms_lr_and_the_record(one_epoch):
    out = one_epoch
    scalars = _scalars(out / "tensorboard")
    for term in (*LOSS_TERMS, "loss", "lr"):
        assert [step for step, _ in scalars[f"train/{term}"]] == [0, 1], term  # 4 images, -b 2: 2 batches
    for name in ("segm_AP", "segm_AP50", "bbox_AP", "recall", "overlap_segm_AP", "count_mae"):
        assert [step for step, _ in scalars[f"val/{name}"]] == [1], name
    assert scalars["epoch/loss"][0][1] == pytest.approx(
        sum(v for _, v in scalars["train/loss"]) / 2, rel=1e-5)  # the epoch mean of the batches
    assert scalars["train/lr"][1][1] > scalars["train/lr"][0][1] > 0  # warming up


def test_a_resumed_run_appends_to_the_same_log(one_epoch, tiny_coco, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    resume = tiny_args(tiny_coco, out, "--epochs", "2", "--tensorboard", "--print-freq", "1", "--resume",
                       str(out / "model_0.pth"), seed=False)
    assert train.main(resume) == 0
    scalars = _scalars(out / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [0, 1, 2, 3]
    assert [step for step, _ in scalars["val/segm_AP"]] == [1, 3]


def test_without_the_package_it_is_one_line_before_training(tiny_coco, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    out = tmp_path / "none"
    assert train.main(tiny_args(tiny_coco, out, "--epochs", "1", "--tensorboard")) == 2
    err = capsys.readouterr().err
    assert err == "error: --tensorboard needs the tensorboard package: pip install tensorboard\n"
    assert not out.exists()  # refused before anything was created


def test_a_file_where_the_log_goes_is_one_line_before_anything_is_read_or_created(tiny_coco, tmp_path, monkeypatch,
                                                                                 capsys):
    """tensorboard's own FileExistsError came after the data checks and left an empty --output-dir behind."""
    pytest.importorskip("tensorboard")
    from train_utils.engine import setup

    def no_work(*args, **kwargs):
        raise AssertionError("the run started before its output folders were checked")

    monkeypatch.setattr(setup, "load_checkpoint", no_work)
    monkeypatch.setattr(setup, "load_datasets", no_work)
    taken = tmp_path / "events"
    taken.write_text("a file")
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_coco, out, "--tensorboard", "--tensorboard-dir", str(taken))) == 2
    assert capsys.readouterr().err == f"error: --tensorboard-dir {taken} is a file, not a folder\n"
    assert not out.exists()
    out.mkdir()
    (out / "tensorboard").write_text("a file where the default log folder goes")
    assert train.main(tiny_args(tiny_coco, out, "--tensorboard")) == 2
    assert capsys.readouterr().err == f"error: --tensorboard {out / 'tensorboard'} is a file, not a folder\n"
    assert [p.name for p in out.iterdir()] == ["tensorboard"]


def test_record_scalars_are_flat_numbers():
    record = {"segm": {"AP": 0.5, "summary_lines": ["x"], "per_class_AP50": {1: 0.7}}, "bbox": None,
              "overlap_segm": {"AP": 0.25, "recall": 0.5, "num_instances": 3}, "count_mae": 1.0}
    assert record_scalars(record) == {"segm_AP": 0.5, "overlap_segm_AP": 0.25, "overlap_segm_recall": 0.5,
                                      "count_mae": 1.0}
