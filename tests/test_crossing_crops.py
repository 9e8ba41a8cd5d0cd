"""tools/crossing_crops.py: one crop per cluster of crossing chromosomes, control crops, amodal clipping."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from tests.conftest import bar_polygon
from tools.coco_layout import polygon_bbox_area, write_coco_split
from tools.crossing_crops import CONTROL, CROSSING, cut_crops, main


def two_crossing_bars_and_a_lone_one(root, size=(320, 160)):
    """An image with an X of two bars on the left and one bar far to the right."""
    width, height = size
    (root / "images").mkdir(parents=True)
    Image.new("L", size, 10).save(root / "images" / "cell.png")
    polys = [bar_polygon(60, 80, 70, 10, 35), bar_polygon(60, 80, 70, 10, 145), bar_polygon(260, 80, 50, 10, 90)]
    anns = []
    for k, poly in enumerate(polys):
        bbox, area = polygon_bbox_area([poly], height, width)
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": [poly], "bbox": bbox,
                     "area": area, "iscrowd": 0})
    write_coco_split(root, "val", [{"id": 1, "file_name": "cell.png", "width": width, "height": height}], anns,
                     [{"id": 1, "name": "chr"}])
    return polys


def test_two_crossing_bars_and_a_lone_bar_give_one_cluster_crop_and_one_control(tmp_path):
    two_crossing_bars_and_a_lone_one(tmp_path / "src")
    counts = cut_crops(tmp_path / "src", "val", tmp_path / "out", crop_size=100, margin=5)
    doc = json.loads((tmp_path / "out" / "annotations" / "instances_val.json").read_text())
    kinds = [img["kind"] for img in doc["images"]]
    assert sorted(kinds) == [CONTROL, CROSSING]
    assert (counts.clusters, counts.controls, counts.crossing_instances, counts.pairs) == (1, 1, 2, 1)
    crossing = next(img for img in doc["images"] if img["kind"] == CROSSING)
    control = next(img for img in doc["images"] if img["kind"] == CONTROL)
    crossing_anns = [a for a in doc["annotations"] if a["image_id"] == crossing["id"]]
    control_anns = [a for a in doc["annotations"] if a["image_id"] == control["id"]]
    assert len(crossing_anns) == 2 and all(a["overlapping"] and a["focus"] for a in crossing_anns)
    assert crossing["pairs"] == [[crossing_anns[0]["id"], crossing_anns[1]["id"]]]
    assert len(control_anns) == 1 and not control_anns[0]["overlapping"] and control_anns[0]["focus"]
    assert control["x"] >= 160  # the control holds the lone bar, away from the X
    for img in doc["images"]:
        assert Image.open(tmp_path / "out" / "images" / img["file_name"]).size == (100, 100)


def test_clipping_keeps_the_amodal_outlines(tmp_path):
    polys = two_crossing_bars_and_a_lone_one(tmp_path / "src")
    cut_crops(tmp_path / "src", "val", tmp_path / "out", crop_size=100, margin=5)
    doc = json.loads((tmp_path / "out" / "annotations" / "instances_val.json").read_text())
    crossing = next(img for img in doc["images"] if img["kind"] == CROSSING)
    x, y = crossing["x"], crossing["y"]
    crossing_anns = [a for a in doc["annotations"] if a["image_id"] == crossing["id"]]
    for ann, poly in zip(crossing_anns, polys[:2]):
        full = mask_utils.decode(mask_utils.frPyObjects([poly], 160, 320))[..., 0]
        expected = full[y:y + 100, x:x + 100]
        got = mask_utils.decode(ann["segmentation"])
        np.testing.assert_array_equal(got, expected)  # the crossing stays in both masks
    masks = [mask_utils.decode(a["segmentation"]) for a in crossing_anns]
    assert (masks[0] & masks[1]).sum() >= 20


def test_a_cluster_larger_than_the_crop_is_clipped_and_counted(tmp_path):
    two_crossing_bars_and_a_lone_one(tmp_path / "src")
    counts = cut_crops(tmp_path / "src", "val", tmp_path / "out", crop_size=48, margin=0, controls=0)
    assert counts.clusters == 1 and counts.too_large == 1 and counts.controls == 0


def test_main_prints_the_counts_and_refuses_a_missing_split_in_one_line(tmp_path, capsys):
    two_crossing_bars_and_a_lone_one(tmp_path / "src")
    assert main(["--data-path", str(tmp_path / "src"), "--split", "val", "--out", str(tmp_path / "out"),
                 "--crop-size", "100"]) == 0
    assert "1 crossing crops (2 crossing instances, 1 crossing pairs" in capsys.readouterr().out
    assert main(["--data-path", str(tmp_path / "src"), "--split", "nope", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crossing_crops.py: error:") and "nope" in err and "\n" not in err
