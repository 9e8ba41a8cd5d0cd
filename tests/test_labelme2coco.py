from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from my_dataset_chromosome import ChromosomeDataset
from tools import labelme2coco

H, W = 48, 64


def png_bytes(value: int = 30, size: tuple[int, int] = (W, H)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def polygon(points: list[list[float]], label: str = "chr", **extra) -> dict:
    return {"label": label, "points": points, "group_id": None, "shape_type": "polygon", "flags": {}, **extra}


def write_labelme(path: Path, shapes: list[dict], *, image: bytes | None = None, embed: bool = True,
                  image_name: str | None = None, size: tuple[int, int] = (W, H)) -> Path:
    """A labelme JSON; the image is embedded, or written next to it as ``image_name`` when ``embed`` is False."""
    image = image if image is not None else png_bytes(size=size)
    image_name = image_name or f"{path.stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not embed:
        (path.parent / image_name).write_bytes(image)
    doc = {"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": image_name,
           "imageData": base64.b64encode(image).decode() if embed else None,
           "imageHeight": size[1], "imageWidth": size[0]}
    path.write_text(json.dumps(doc))
    return path


def read_coco(out: Path, split: str = "train") -> dict:
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def test_converts_files_and_folders_with_embedded_and_referenced_images(tmp_path, capsys):
    crossing = [polygon(rect(10, 20, 40, 26)), polygon(rect(20, 5, 26, 40))]
    write_labelme(tmp_path / "in" / "b.json", crossing + [polygon(rect(50, 30, 58, 44), label="nucleus")])
    write_labelme(tmp_path / "in" / "a.json", [polygon(rect(2, 2, 8, 12))], embed=False, image_name="a_raw.png",
                  image=png_bytes(99))
    write_labelme(tmp_path / "single" / "c.json", [], image=png_bytes(7))
    out = tmp_path / "out"
    assert labelme2coco.main([str(tmp_path / "in"), str(tmp_path / "single" / "c.json"), "--out", str(out)]) == 0

    doc = read_coco(out)
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in doc["images"]] == [
        (1, "a.png", W, H), (2, "b.png", W, H), (3, "c.png", W, H)]
    assert (out / "images" / "a.png").read_bytes() == png_bytes(99)  # copied from imagePath, not re-encoded
    assert (out / "images" / "c.png").read_bytes() == png_bytes(7)
    assert doc["categories"] == [{"id": 1, "name": "chr"}, {"id": 2, "name": "nucleus"}]
    anns = doc["annotations"]
    assert [(a["id"], a["image_id"], a["category_id"]) for a in anns] == [(1, 1, 1), (2, 2, 1), (3, 2, 1), (4, 2, 2)]
    assert [a["overlapping"] for a in anns] == [False, True, True, False]
    for ann in anns:  # bbox and area as pycocotools rasterises the polygon
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], H, W))
        assert ann["bbox"] == mask_utils.toBbox(rle).tolist() and ann["area"] == float(mask_utils.area(rle))
        assert ann["iscrowd"] == 0
    assert anns[1]["segmentation"] == [[10, 20, 40, 20, 40, 26, 10, 26]]

    printed = capsys.readouterr().out
    assert "3 images, 4 instances" in printed and "  chr: 3" in printed and "  nucleus: 1" in printed
    assert "overlapping instances: 2 (50.0%)" in printed and "skipped: nothing" in printed

    ds = ChromosomeDataset(out, "train")
    assert len(ds) == 3 and ds.label_names == {1: "chr", 2: "nucleus"}
    assert ds[1][1]["overlapping"].tolist() == [True, True, False]
    assert ds[2][1]["boxes"].shape == (0, 4)  # the image without shapes stays


def test_labels_order_and_unlisted_labels_are_skipped(tmp_path, capsys):
    write_labelme(tmp_path / "a.json", [polygon(rect(2, 2, 8, 12), "a"), polygon(rect(20, 2, 28, 12), "b"),
                                        polygon(rect(40, 2, 48, 12), "c")])
    out = tmp_path / "out"
    assert labelme2coco.main([str(tmp_path / "a.json"), "--out", str(out), "--labels", "b,a", "--split", "val"]) == 0
    doc = read_coco(out, "val")
    assert doc["categories"] == [{"id": 1, "name": "b"}, {"id": 2, "name": "a"}]
    assert [a["category_id"] for a in doc["annotations"]] == [2, 1]
    assert "skipped 1 (label 'c' not in --labels): a.json" in capsys.readouterr().out


def test_labels_matching_nothing_is_an_error_not_an_empty_split(tmp_path, capsys):
    write_labelme(tmp_path / "a.json", [polygon(rect(2, 2, 12, 12))])
    assert labelme2coco.main([str(tmp_path / "a.json"), "--out", str(tmp_path / "out"), "--labels", "foo,bar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: nothing to write for split 'train': 1 image(s), 0 instance(s) with labels foo, bar; 1 "
                   "skipped (label 'chr' not in --labels)"], err
    assert not (tmp_path / "out" / "annotations" / "instances_train.json").exists()


def test_shapes_sharing_a_group_id_become_one_multi_part_instance(tmp_path):
    shapes = [polygon(rect(2, 2, 10, 10), group_id=3), polygon(rect(30, 30, 40, 40), group_id=3),
              polygon(rect(50, 2, 60, 10), group_id=None), polygon(rect(50, 20, 60, 30), group_id=None)]
    write_labelme(tmp_path / "g.json", shapes)
    labelme2coco.convert_labelme([tmp_path / "g.json"], tmp_path / "out")
    anns = read_coco(tmp_path / "out")["annotations"]
    assert [len(a["segmentation"]) for a in anns] == [2, 1, 1]
    assert anns[0]["bbox"] == [2.0, 2.0, 38.0, 38.0]


def test_degenerate_and_non_polygon_shapes_are_skipped_and_reported(tmp_path, capsys):
    shapes = [
        polygon([[1, 1], [5, 5]]),  # 2 points
        polygon([[3, 3], [6, 6], [9, 9]]),  # collinear: zero area
        polygon(rect(100, 100, 120, 120)),  # outside the image
        {**polygon(rect(2, 2, 9, 9)), "shape_type": "rectangle"},
        polygon(rect(2, 2, 9, 9), group_id=1), polygon([[1, 1], [2, 2]], group_id=1),  # one good part, one bad
    ]
    write_labelme(tmp_path / "d.json", shapes)
    assert labelme2coco.main([str(tmp_path / "d.json"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    for line in ("skipped 2 (fewer than 3 points): d.json", "skipped 1 (zero area): d.json",
                 "skipped 1 (outside the image): d.json", "skipped 1 (shape type 'rectangle' is not a polygon)"):
        assert line in printed
    anns = read_coco(tmp_path / "out")["annotations"]
    assert len(anns) == 1 and anns[0]["segmentation"] == [[2, 2, 9, 2, 9, 9, 2, 9]]


def test_image_names_are_unique_and_stable(tmp_path):
    write_labelme(tmp_path / "one" / "x.json", [polygon(rect(2, 2, 9, 9))], image=png_bytes(10))
    write_labelme(tmp_path / "two" / "x.json", [polygon(rect(2, 2, 9, 9))], image=png_bytes(20))
    out = tmp_path / "out"
    labelme2coco.convert_labelme([tmp_path / "one", tmp_path / "two"], out)
    assert [i["file_name"] for i in read_coco(out)["images"]] == ["x.png", "x_2.png"]
    assert (out / "images" / "x_2.png").read_bytes() == png_bytes(20)
    # again, and another split into the same root: nothing is overwritten, names do not drift
    labelme2coco.convert_labelme([tmp_path / "one", tmp_path / "two"], out)
    labelme2coco.convert_labelme([tmp_path / "two"], out, split="val")
    assert [i["file_name"] for i in read_coco(out)["images"]] == ["x.png", "x_2.png"]
    assert [i["file_name"] for i in read_coco(out, "val")["images"]] == ["x_2.png"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["x.png", "x_2.png"]
    assert (out / "images" / "x.png").read_bytes() == png_bytes(10)


def _error(argv: list[str], capsys) -> str:
    assert labelme2coco.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
    return lines[0]


def test_bad_inputs_give_one_line_naming_the_culprit(tmp_path, capsys):
    out = str(tmp_path / "out")
    (tmp_path / "broken.json").write_text('{"shapes": [')
    assert "malformed JSON in" in _error([str(tmp_path / "broken.json"), "--out", out], capsys)
    assert "broken.json" in _error([str(tmp_path / "broken.json"), "--out", out], capsys)

    assert "/nope' matches no file or folder" in _error([str(tmp_path / "nope"), "--out", out], capsys)
    (tmp_path / "empty_dir").mkdir()
    assert "empty_dir holds no labelme files (.json)" in _error([str(tmp_path / "empty_dir"), "--out", out], capsys)

    write_labelme(tmp_path / "ref.json", [], embed=False, image_name="gone.png")
    (tmp_path / "gone.png").unlink()
    message = _error([str(tmp_path / "ref.json"), "--out", out], capsys)
    assert "ref.json" in message and "gone.png" in message and "not found" in message

    doc = json.loads((tmp_path / "ref.json").read_text())
    (tmp_path / "b64.json").write_text(json.dumps({**doc, "imageData": "@@not base64@@"}))
    assert "b64.json: \"imageData\" is not valid base64" in _error([str(tmp_path / "b64.json"), "--out", out], capsys)
    not_an_image = base64.b64encode(b"valid base64 of text, not of a picture").decode()
    (tmp_path / "text.json").write_text(json.dumps({**doc, "imageData": not_an_image}))
    message = _error([str(tmp_path / "text.json"), "--out", out], capsys)
    assert f"{tmp_path / 'text.json'}: \"imageData\" is not an image Pillow can read" in message
    assert "BytesIO" not in message and " at 0x" not in message
    (tmp_path / "text.png").write_bytes(b"not a picture either")
    (tmp_path / "ref_text.json").write_text(json.dumps({**doc, "imagePath": "text.png"}))
    message = _error([str(tmp_path / "ref_text.json"), "--out", out], capsys)
    assert f"ref_text.json: its image {tmp_path / 'text.png'} is not an image Pillow can read" in message

    write_labelme(tmp_path / "size.json", [], size=(W, H))
    doc = json.loads((tmp_path / "size.json").read_text())
    (tmp_path / "size.json").write_text(json.dumps({**doc, "imageWidth": W + 5}))
    message = _error([str(tmp_path / "size.json"), "--out", out], capsys)
    assert "size.json" in message and f"{W}x{H} but the annotation says {W + 5}x{H}" in message

    for points in ([[1, "x"], [2, 2], [3, 1]], [[1, 1], [2], [3, 1]], None):
        write_labelme(tmp_path / "pts.json", [polygon(points)])
        message = _error([str(tmp_path / "pts.json"), "--out", out], capsys)
        assert "pts.json: shape 'chr' has malformed \"points\"" in message
    for far in (1e9, float("inf"), float("nan")):  # pycocotools would rasterise the whole outline and run out of memory
        write_labelme(tmp_path / "far.json", [polygon([[1, 1], [far, 2], [3, 9]])])
        message = _error([str(tmp_path / "far.json"), "--out", out], capsys)
        assert "far.json: a polygon point is not finite or lies far outside the 64x48 image" in message

    write_labelme(tmp_path / "ok.json", [])
    assert "--labels repeats a" in _error([str(tmp_path / "ok.json"), "--out", out, "--labels", "a,b,a"], capsys)
    assert "--split '' is not a usable split name" in _error([str(tmp_path / "ok.json"), "--out", out, "--split", ""],
                                                             capsys)


def test_real_bioimlab_train_converts_to_109_images_and_4565_instances(bioimlab, tmp_path, capsys):
    out = tmp_path / "bioimlab"
    start = time.perf_counter()
    assert labelme2coco.main([str(bioimlab / "labelme" / "train"), "--out", str(out), "--split", "train"]) == 0
    assert time.perf_counter() - start < 30
    printed = capsys.readouterr().out
    assert "109 images, 4565 instances" in printed and "skipped: nothing" in printed

    ds = ChromosomeDataset(out, "train")
    assert len(ds) == 109 and ds.label_names == {1: "chr"}
    assert len(ds.coco.getAnnIds(imgIds=ds.ids)) == 4565
    doc = read_coco(out)
    overlapping = sum(a["overlapping"] for a in doc["annotations"]) / len(doc["annotations"])
    assert 0.04 < overlapping < 0.12  # the README: about 1 in 14
    for index in (0, 54, 108):  # decode only a few
        image, target = ds[index]
        height, width = image.shape[-2:]
        assert (height, width) == (576, 768)
        boxes = target["boxes"]
        assert len(boxes) == len(ds.coco.getAnnIds(imgIds=[ds.ids[index]])) > 0
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert target["masks"].flatten(1).sum(1).min() > 0

    # pycocotools accepts the file: ground truth scored against itself is perfect
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "annotations" / "instances_train.json"))
        image_ids = ds.ids[:3]
        results = [{**a, "score": 1.0} for a in coco.loadAnns(coco.getAnnIds(imgIds=image_ids))]
        evaluator = COCOeval(coco, coco.loadRes(results), "segm")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


@pytest.mark.parametrize("module_name, argv, says", [
    ("labelme2coco", ["--bogus", "x", "--out", "y"], "unrecognized arguments"),
    ("xml2coco", [], "required"),
    # a negative area would mark two isolated chromosomes as crossing
    ("labelme2coco", ["x", "--out", "y", "--min-overlap-area", "-1"], "--min-overlap-area: -1 must be >= 0.0"),
    ("xml2coco", ["x", "--out", "y", "--min-overlap-area", "nan"], "--min-overlap-area: 'nan' is not a finite"),
])
def test_converter_usage_errors_are_one_line(module_name, argv, says, capsys):
    import importlib
    module = importlib.import_module(f"tools.{module_name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "error:" in err and says in err
