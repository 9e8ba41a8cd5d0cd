from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from my_dataset_chromosome import ChromosomeDataset, DatasetError
from tools import xml2coco

H, W = 48, 64


def pts(*xy: tuple[float, float]) -> str:
    return ";".join(f"{x:.2f},{y:.2f}" for x, y in xy)


def rect_pts(x0: float, y0: float, x1: float, y1: float) -> str:
    return pts((x0, y0), (x1, y0), (x1, y1), (x0, y1))


CVAT_XML = f"""<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><task><name>metaphases</name></task></meta>
  <image id="0" name="spreads/m1.png" width="{W}" height="{H}">
    <polygon label="chr" occluded="0" source="manual" points="{rect_pts(10, 20, 40, 26)}" z_order="0"/>
    <polygon label="chr" occluded="1" source="manual" points="{rect_pts(20, 5, 26, 40)}" z_order="1">
      <attribute name="type">acrocentric</attribute>
    </polygon>
    <polygon label="chr" source="manual" points="{rect_pts(50, 2, 56, 8)}" group_id="4"/>
    <polygon label="chr" source="manual" points="{rect_pts(50, 30, 56, 40)}" group_id="4"/>
    <polygon label="chr" source="manual" points="{pts((1, 1), (3, 3))}"/>
    <box label="chr" source="manual" xtl="1" ytl="1" xbr="5" ybr="5"/>
    <polygon label="nucleus" source="manual" points="{rect_pts(2, 30, 12, 44)}"/>
    <tag label="good"/>
  </image>
  <image id="1" name="m2.png" width="{W}" height="{H}">
  </image>
</annotations>
"""


def make_cvat(root: Path) -> Path:
    (root / "spreads").mkdir(parents=True)
    Image.new("L", (W, H), 10).save(root / "spreads" / "m1.png")
    Image.new("L", (W, H), 20).save(root / "m2.png")
    (root / "task.xml").write_text(CVAT_XML)
    return root / "task.xml"


def read_coco(out: Path, split: str = "train") -> dict:
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def test_cvat_polygons_groups_and_skipped_shapes(tmp_path, capsys):
    xml_path = make_cvat(tmp_path / "cvat")
    out = tmp_path / "out"
    assert xml2coco.main([str(xml_path), "--out", str(out)]) == 0
    doc = read_coco(out)
    assert [(i["file_name"], i["width"], i["height"]) for i in doc["images"]] == [("m1.png", W, H), ("m2.png", W, H)]
    assert doc["categories"] == [{"id": 1, "name": "chr"}, {"id": 2, "name": "nucleus"}]
    anns = doc["annotations"]
    assert [(a["image_id"], a["category_id"], len(a["segmentation"])) for a in anns] == [
        (1, 1, 1), (1, 1, 1), (1, 1, 2), (1, 2, 1)]
    assert [a["overlapping"] for a in anns] == [True, True, False, False]
    assert anns[0]["segmentation"] == [[10, 20, 40, 20, 40, 26, 10, 26]]
    for ann in anns:
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], H, W))
        assert ann["bbox"] == mask_utils.toBbox(rle).tolist() and ann["area"] == float(mask_utils.area(rle))
    printed = capsys.readouterr().out
    assert "2 images, 4 instances" in printed
    assert "skipped 1 (fewer than 3 points): task.xml:spreads/m1.png" in printed
    assert "skipped 1 (shape <box> is not a polygon)" in printed

    ds = ChromosomeDataset(out, "train")
    assert len(ds) == 2 and ds[0][1]["masks"].shape == (4, H, W) and ds[1][1]["masks"].shape == (0, H, W)


def test_cvat_images_folder_and_labels(tmp_path):
    xml_path = make_cvat(tmp_path / "cvat")
    moved = tmp_path / "pictures"
    moved.mkdir()
    (tmp_path / "cvat" / "spreads" / "m1.png").rename(moved / "m1.png")  # found by its base name
    (tmp_path / "cvat" / "m2.png").rename(moved / "m2.png")
    out = tmp_path / "out"
    summary = xml2coco.convert_xml(xml_path, out, "val", labels=["nucleus"], images_dir=moved)
    assert summary.instances == {"nucleus": 1} and summary.skipped["label 'chr' not in --labels"] == 5
    assert read_coco(out, "val")["categories"] == [{"id": 1, "name": "nucleus"}]


def make_voc(root: Path) -> Path:
    for sub in ("Annotations", "SegmentationObject", "JPEGImages", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    objects = np.zeros((H, W), dtype=np.uint8)
    objects[5:15, 5:20] = 1
    objects[20:40, 30:36] = 2
    objects[4:16, 4:21][(objects[4:16, 4:21] == 0)] = 255  # void band around object 1
    for stem, names in (("2007_000001", ["chr", "nucleus", "chr"]), ("2007_000002", ["chr"])):
        Image.new("RGB", (W, H), (30, 30, 30)).save(root / "JPEGImages" / f"{stem}.jpg")
        objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{W}</width><height>{H}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
    palette = Image.fromarray(objects, "P")
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192])
    palette.save(root / "SegmentationObject" / "2007_000001.png")
    return root


def test_voc_object_masks_become_rle_instances(tmp_path, capsys):
    voc = make_voc(tmp_path / "voc")
    out = tmp_path / "out"
    assert xml2coco.main([str(voc), "--out", str(out)]) == 0
    doc = read_coco(out)
    assert [i["file_name"] for i in doc["images"]] == ["2007_000001.jpg"]
    assert doc["categories"] == [{"id": 1, "name": "chr"}, {"id": 2, "name": "nucleus"}]
    anns = doc["annotations"]
    assert [(a["category_id"], a["bbox"], a["area"]) for a in anns] == [
        (1, [5.0, 5.0, 15.0, 10.0], 150.0), (2, [30.0, 20.0, 6.0, 20.0], 120.0)]
    assert all(isinstance(a["segmentation"]["counts"], str) for a in anns)
    printed = capsys.readouterr().out
    assert "skipped 1 (image without a SegmentationObject PNG): 2007_000002" in printed
    assert "skipped 1 (object with an empty mask): 2007_000001" in printed

    ds = ChromosomeDataset(out, "train")
    masks = ds[0][1]["masks"].numpy()
    assert masks.shape == (2, H, W) and masks[0, 5:15, 5:20].all() and masks[0].sum() == 150
    assert masks[1, 20:40, 30:36].all() and masks[1].sum() == 120


def test_voc_image_set_list_picks_the_split(tmp_path):
    voc = make_voc(tmp_path / "voc")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    # the val list names only 2007_000002, which has no SegmentationObject PNG: nothing to write is an error
    with pytest.raises(DatasetError, match=r"nothing to write for split 'val': 0 image\(s\), 0 instance\(s\); 1 "
                                           r"skipped \(image without a SegmentationObject PNG\)"):
        xml2coco.convert_xml(voc, tmp_path / "out", split="val")
    assert not (tmp_path / "out" / "annotations" / "instances_val.json").exists()


def _error(argv: list[str], capsys) -> str:
    assert xml2coco.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_bad_inputs_give_one_line_naming_the_culprit(tmp_path, capsys):
    out = str(tmp_path / "out")
    (tmp_path / "bad.xml").write_text("<annotations><image name='a.png'")
    assert "malformed XML in" in _error([str(tmp_path / "bad.xml"), "--out", out], capsys)
    (tmp_path / "voc.xml").write_text("<annotation/>")
    assert "voc.xml is not a CVAT for-images XML" in _error([str(tmp_path / "voc.xml"), "--out", out], capsys)
    (tmp_path / "missing.xml").write_text(
        f"<annotations><image name='nope.png' width='{W}' height='{H}'/></annotations>")
    message = _error([str(tmp_path / "missing.xml"), "--out", out], capsys)
    assert "missing.xml" in message and "image 'nope.png' not found" in message
    (tmp_path / "plain").mkdir()
    assert "plain is a folder without Annotations/" in _error([str(tmp_path / "plain"), "--out", out], capsys)
    assert "input not found" in _error([str(tmp_path / "absent.xml"), "--out", out], capsys)

    xml_path = make_cvat(tmp_path / "cvat")
    xml_path.write_text(CVAT_XML.replace(f'width="{W}" height="{H}">\n    <polygon', f'width="{W + 1}" height="{H}">'
                                         "\n    <polygon", 1))
    assert f"is {W}x{H} but the annotation says {W + 1}x{H}" in _error([str(xml_path), "--out", out], capsys)
    xml_path.write_text(CVAT_XML)
    (xml_path.parent / "m2.png").write_text("text, not a picture")
    message = _error([str(xml_path), "--out", out], capsys)
    assert message.endswith(f"{xml_path.parent / 'm2.png'} is not an image Pillow can read (PNG, JPEG, TIFF, BMP, ...)")

    voc = make_voc(tmp_path / "voc")
    (voc / "JPEGImages" / "2007_000001.jpg").unlink()
    message = _error([str(voc), "--out", out], capsys)
    assert "2007_000001.xml" in message and "2007_000001.jpg not found" in message


@pytest.mark.parametrize("points", ["1,2;3", "a,b;c,d;e,f"])
def test_malformed_cvat_points_name_the_line(tmp_path, points):
    make_cvat(tmp_path)
    (tmp_path / "p.xml").write_text(f"<annotations>\n<image name='m2.png' width='{W}' height='{H}'>\n"
                                    f"<polygon label='chr' points='{points}'/></image></annotations>")
    with pytest.raises(xml2coco.DatasetError, match=r"p\.xml: polygon at line 3 has malformed points"):
        xml2coco.convert_xml(tmp_path / "p.xml", tmp_path / "out")
