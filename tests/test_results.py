"""The per-epoch result files: the seeds' exact line format, append/replace semantics, strict JSON lines."""
from __future__ import annotations

import json
import math
import re

import pytest

from train_utils.outputs import results

LINE_RE = re.compile(r"^epoch:\d+ (-?\d+\.\d{4}  ){13}\d+\.\d{6}$")


def test_format_epoch_line_is_the_seeds_format():
    stats = [0.5, 0.75, 0.25, -1, 0.123456, 1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    line = results.format_epoch_line(3, stats, 1.23456, 0.02)
    assert line == ("epoch:3 0.5000  0.7500  0.2500  -1.0000  0.1235  1.0000  0.1000  0.2000  0.3000  0.4000  "
                    "0.5000  0.6000  1.2346  0.020000")
    assert LINE_RE.match(line)
    assert results.parse_epoch_line(line) == (3, [0.5, 0.75, 0.25, -1.0, 0.1235, 1.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6,
                                                  1.2346, 0.02])


def test_format_epoch_line_needs_twelve_stats():
    with pytest.raises(ValueError, match="12"):
        results.format_epoch_line(0, [0.0] * 11, 1.0, 0.1)


def test_write_epoch_line_appends_and_replaces_in_place(tmp_path):
    path = tmp_path / "seg_results.txt"
    lines = {e: results.format_epoch_line(e, [e / 10] * 12, 1.0 + e, 0.01) for e in range(3)}
    for e in range(3):
        results.write_epoch_line(path, e, lines[e])
    assert path.read_text() == "".join(lines[e] + "\n" for e in range(3))

    # an epoch run again (resume from an older checkpoint) replaces its own line only
    again = results.format_epoch_line(1, [0.9] * 12, 0.5, 0.005)
    results.write_epoch_line(path, 1, again)
    assert path.read_text().splitlines() == [lines[0], again, lines[2]]
    # a new epoch is appended, nothing is truncated
    four = results.format_epoch_line(3, [0.3] * 12, 0.3, 0.001)
    results.write_epoch_line(path, 3, four)
    assert path.read_text().splitlines() == [lines[0], again, lines[2], four]
    assert not list(tmp_path.glob("*.tmp"))


def test_write_epoch_line_does_not_confuse_epoch_1_and_10(tmp_path):
    path = tmp_path / "det_results.txt"
    ten = results.format_epoch_line(10, [0.1] * 12, 1.0, 0.01)
    results.write_epoch_line(path, 10, ten)
    one = results.format_epoch_line(1, [0.2] * 12, 1.0, 0.01)
    results.write_epoch_line(path, 1, one)
    assert path.read_text().splitlines() == [ten, one]


def test_write_epoch_line_after_a_file_without_final_newline(tmp_path):
    path = tmp_path / "seg_results.txt"
    zero = results.format_epoch_line(0, [0.1] * 12, 1.0, 0.01)
    path.write_text(zero)
    one = results.format_epoch_line(1, [0.2] * 12, 1.0, 0.01)
    results.write_epoch_line(path, 1, one)
    assert path.read_text() == f"{zero}\n{one}\n"


def test_write_epoch_line_rejects_a_line_of_another_epoch(tmp_path):
    with pytest.raises(ValueError, match="epoch:2"):
        results.write_epoch_line(tmp_path / "x.txt", 2, results.format_epoch_line(1, [0] * 12, 1, 1))


def test_append_jsonl_is_strict_json_and_one_record_per_epoch(tmp_path):
    path = tmp_path / "metrics.jsonl"
    results.append_jsonl(path, {"epoch": 0, "loss": 1.0, "segm": {"AP": float("nan")}, "sizes": (1, 2)})
    results.append_jsonl(path, {"epoch": 1, "loss": 0.5})
    results.append_jsonl(path, {"epoch": 0, "loss": 0.9})  # epoch 0 run again
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 0, "loss": 0.9}, {"epoch": 1, "loss": 0.5}]
    results.append_jsonl(path, {"epoch": 2, "x": math.inf})
    assert results.read_jsonl(path)[-1] == {"epoch": 2, "x": None}
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_json_safe():
    value = {"a": (1.0, float("nan")), 2: {"b": float("-inf")}}
    assert results.json_safe(value) == {"a": [1.0, None], "2": {"b": None}}
