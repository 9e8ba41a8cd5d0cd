"""The dataset viewer: pictures of ground truth for any root and split, side by side with a second dataset."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tools import show_dataset, synth_metaphase


def _pictures(out) -> list:
    return sorted(out.glob("*.png"))


def test_writes_one_picture_per_image_with_raw_and_annotated_panels(tiny_coco, tmp_path, capsys):
    out = tmp_path / "show"
    assert show_dataset.main(["--data-path", str(tiny_coco), "--split", "val", "--out", str(out), "--num", "5"]) == 0
    pictures = _pictures(out)
    assert len(pictures) == 2  # the val split has two images
    printed = capsys.readouterr().out
    assert "instances/image: mean 4.0" in printed and "overlapping fraction" in printed

    with Image.open(pictures[0]) as picture:
        both = np.asarray(picture.convert("RGB"))
    assert show_dataset.main(["--data-path", str(tiny_coco), "--split", "val", "--out", str(tmp_path / "one"),
                              "--num", "1", "--no-raw", "--no-stats"]) == 0
    with Image.open(_pictures(tmp_path / "one")[0]) as picture:
        annotated = np.asarray(picture.convert("RGB"))
    assert both.shape[0] == annotated.shape[0] and both.shape[1] > 2 * annotated.shape[1] - 20
    assert "instances/image" not in capsys.readouterr().out
    # the annotated panel is coloured (masks, boxes, the outline of the crossing pair); the raw bars are grey
    raw_half, drawn_half = both[:, : both.shape[1] // 2], both[:, both.shape[1] // 2:]
    spread = lambda a: (a.max(-1).astype(int) - a.min(-1)).mean()  # noqa: E731
    assert spread(drawn_half) > spread(raw_half) + 5


def test_compare_puts_a_second_dataset_below(tiny_coco, tmp_path):
    synth = tmp_path / "synth"
    assert synth_metaphase.main(["--out", str(synth), "--num-images", "1", "--size", "160x128",
                                 "--chromosomes", "6"]) == 0
    single, double = tmp_path / "single", tmp_path / "double"
    assert show_dataset.main(["--data-path", str(synth), "--out", str(single), "--no-stats"]) == 0
    assert show_dataset.main(["--data-path", str(synth), "--out", str(double), "--compare", str(tiny_coco),
                              "--compare-split", "val"]) == 0
    other = tmp_path / "other"
    assert show_dataset.main(["--data-path", str(tiny_coco), "--split", "val", "--out", str(other), "--num", "1",
                              "--no-stats"]) == 0
    (one,), (two,), (below,) = _pictures(single), _pictures(double), _pictures(other)
    with Image.open(one) as a, Image.open(two) as b, Image.open(below) as c:
        top, bottom, lower = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")), np.asarray(c.convert("RGB"))
    # the first row is the dataset's own picture, the second the compared dataset's first item, 6 px below
    assert np.array_equal(bottom[:top.shape[0], :top.shape[1]], top)
    start = bottom.shape[0] - lower.shape[0]
    assert start >= top.shape[0] + 6 and np.array_equal(bottom[start:, :lower.shape[1]], lower)


def test_real_data_next_to_synthetic(bioimlab, tmp_path):
    from tools import labelme2coco
    real = tmp_path / "real"
    source = sorted((bioimlab / "labelme" / "val").glob("*.json"))[0]
    assert labelme2coco.main([str(source), "--out", str(real), "--split", "val"]) == 0
    synth = tmp_path / "synth"
    assert synth_metaphase.main(["--out", str(synth), "--num-images", "1"]) == 0
    out = tmp_path / "show"
    assert show_dataset.main(["--data-path", str(synth), "--out", str(out), "--compare", str(real),
                              "--compare-split", "val", "--no-stats"]) == 0
    (picture,) = _pictures(out)
    with Image.open(picture) as image:
        assert image.width >= 2 * 768 and image.height >= 2 * 576


def test_bad_input_is_one_line_naming_it(tiny_coco, tmp_path, capsys):
    assert show_dataset.main(["--data-path", str(tiny_coco), "--split", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        show_dataset.main(["--data-path", str(tiny_coco), "--out", str(tmp_path), "--num", "0"])
    assert exit_info.value.code == 2 and "--num" in capsys.readouterr().err
