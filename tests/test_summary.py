"""train_utils/outputs/summary.py: summary.csv, whose exact format a spreadsheet user relies on."""
from __future__ import annotations

import csv
from pathlib import Path

from train_utils.outputs.summary import SUMMARY_CSV, SummaryCsv, count_flag

HEADER = "image_id,file,stem,detections,overlapping,to_review,mean_score,inference_ms,count_flag,status\n"


def entry(image_id: int, stem: str) -> dict:
    return {"id": image_id, "file_name": f"/slides/{stem}.tif", "stem": stem, "inference_ms": 812.5}


def test_summary_csv_is_pinned(tmp_path):
    path = tmp_path / SUMMARY_CSV
    table = SummaryCsv(path, review_below=0.7, expected_count=3)
    assert path.read_text() == HEADER  # written at the start: a run without images still has its header
    table.add(entry(1, "cell_a"), [0.9, 0.8, 0.6], overlapping=1)
    table.fail(2, Path("/slides/broken, really.png"), "broken__really", "cannot read image: truncated")
    table.add(entry(3, "cell_c"), [0.95, 0.9, 0.85, 0.8], overlapping=None)
    table.add(entry(4, "cell_d"), [], overlapping=None)
    assert path.read_text() == HEADER + (
        "1,/slides/cell_a.tif,cell_a,3,1,1,0.7667,812.5,,ok\n"
        '2,"/slides/broken, really.png",broken__really,,,,,,,failed: cannot read image: truncated\n'
        "3,/slides/cell_c.tif,cell_c,4,,0,0.8750,812.5,+1,ok\n"
        "4,/slides/cell_d.tif,cell_d,0,,0,,812.5,-3,ok\n")
    rows = list(csv.DictReader(path.open()))  # what a spreadsheet or pandas reads
    assert [row["count_flag"] for row in rows] == ["", "", "+1", "-3"] and rows[1]["file"].endswith("really.png")


def test_rows_follow_the_image_ids_and_the_file_is_whole_after_every_image(tmp_path):
    path = tmp_path / SUMMARY_CSV
    table = SummaryCsv(path, expected_count=0)
    table.add(entry(2, "b"), [0.5], overlapping=0)
    assert path.read_text() == HEADER + "2,/slides/b.tif,b,1,0,0,0.5000,812.5,,ok\n"
    table.add(entry(1, "a"), [0.5, 0.5], overlapping=0)
    assert [line.split(",")[0] for line in path.read_text().splitlines()[1:]] == ["1", "2"]
    assert not list(tmp_path.glob("*.tmp"))


def test_count_flag_is_the_signed_difference_and_zero_turns_it_off():
    assert count_flag(46, 46) == "" and count_flag(44, 46) == "-2" and count_flag(47, 46) == "+1"
    assert count_flag(3, 0) == "" and count_flag(0, 0) == ""
