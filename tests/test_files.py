"""outputs.files: atomic writes, the output folder check, leftovers of interrupted writes, JSON lines."""
from __future__ import annotations

import json

import pytest

from train_utils.outputs.files import atomic_write, check_output_dir, json_list_text, prepare_output_dir


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "sub" / "record.txt"
    atomic_write(path, lambda tmp: tmp.write_text("first"))
    assert path.read_text() == "first" and not list(path.parent.glob("*.tmp"))

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "first"


def test_json_list_text_is_one_object_a_line():
    items = [{"a": 1}, {"b": [1, 2]}]
    assert json_list_text(items) == '[\n{"a": 1},\n{"b": [1, 2]}\n]\n' and json.loads(json_list_text(items)) == items
    assert json_list_text([]) == "[]\n"


def test_prepare_output_dir_creates_checks_and_names_the_flag(tmp_path):

    made = prepare_output_dir(tmp_path / "a" / "b")
    assert made.is_dir() and list(made.iterdir()) == []  # the write probe is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match=r"^--output-dir .*file is a file, not a folder$"):
        prepare_output_dir(tmp_path / "file")
    with pytest.raises(OSError, match=r"^--crops .*file/sub: cannot write there"):
        prepare_output_dir(tmp_path / "file" / "sub", flag="--crops")


def test_check_output_dir_refuses_what_prepare_would_and_creates_nothing(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^--output-dir .*file is a file, not a folder$"):
        check_output_dir(tmp_path / "file")
    below_a_file = r"^--crops .*file/sub/deeper: cannot write there \(.*file is a file\)$"
    with pytest.raises(NotADirectoryError, match=below_a_file):
        check_output_dir(tmp_path / "file" / "sub" / "deeper", flag="--crops")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unfinished_checkpoint_writes_are_removed(tmp_path):
    from train_utils.outputs.files import remove_unfinished_writes

    for name in ("model_3.pth.tmp", "best.pth.tmp", "model_2.pth", "notes.tmp"):
        (tmp_path / name).write_text("x")
    removed = remove_unfinished_writes(tmp_path)
    assert [p.name for p in removed] == ["best.pth.tmp", "model_3.pth.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_2.pth", "notes.tmp"]
