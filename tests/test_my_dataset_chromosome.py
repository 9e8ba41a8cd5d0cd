from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from my_dataset_chromosome import (
    ChromosomeDataset,
    DatasetError,
    DegenerateAnnotationWarning,
    image_size,
    load_label_json,
    read_image,
    save_label_json,
)
from tools.coco_layout import rle_from_mask

H, W = 30, 40


def square(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_coco(root: Path, split: str, images: list[dict], annotations: list[dict],
               categories: list[dict] | None = None, *, make_files: bool = True,
               ann_name: str | None = None, images_dir: str = "images") -> Path:
    """A COCO file with the given entries; blank grey PNGs for the images unless ``make_files`` is False."""
    (root / images_dir).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    if make_files:
        for img in images:
            Image.new("L", (img["width"], img["height"]), 40).save(root / images_dir / img["file_name"])
    for k, ann in enumerate(annotations, start=1):
        ann.setdefault("id", k)
        ann.setdefault("category_id", 1)
        ann.setdefault("iscrowd", 0)
    doc = {"images": images, "annotations": annotations,
           "categories": categories if categories is not None else [{"id": 1, "name": "chromosome"}]}
    path = root / "annotations" / (ann_name or f"instances_{split}.json")
    path.write_text(json.dumps(doc))
    return path


def image_entry(image_id: int = 1, width: int = W, height: int = H) -> dict:
    return {"id": image_id, "file_name": f"img_{image_id}.png", "width": width, "height": height}


def load(root: Path, split: str = "train", **kwargs) -> ChromosomeDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateAnnotationWarning)
        return ChromosomeDataset(root, split, **kwargs)


# ---------------------------------------------------------------- the dataset on the shared tiny set


def test_tiny_coco_items_have_the_spec_types(tiny_coco):
    ds = load(tiny_coco, "train")
    assert len(ds) == 4 and ds.ids == [1, 2, 3, 4]
    assert ds.num_classes == 1 and ds.label_names == {1: "chromosome"}
    assert ds.label_to_cat_id == {1: 1} and ds.cat_id_to_label == {1: 1}
    assert ds.aspect_ratios() == [160 / 128] * 4
    assert len(ds.coco.getAnnIds()) == 16

    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32 and image.shape == (3, 128, 160)
    assert 0.0 <= image.min() and image.max() <= 1.0
    # the tiny set's background is grey level 20
    assert image[:, 0, 0].tolist() == pytest.approx([20 / 255] * 3)
    masks, boxes = target["masks"], target["boxes"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8 and masks.shape == (4, 128, 160)
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(boxes.canvas_size) == (128, 160)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 1, 1, 1]
    assert target["image_id"] == 1 and isinstance(target["image_id"], int)
    assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [0, 0, 0, 0]
    assert target["area"].dtype == torch.float32
    assert target["area"].tolist() == masks.flatten(1).sum(1).float().tolist()
    assert target["overlapping"].dtype == torch.bool and target["overlapping"].tolist() == [True, True, False, False]
    for box, mask in zip(boxes, masks):
        ys, xs = np.nonzero(mask.numpy())
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # the box is the COCO box of the same annotation
    ann = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[1]))[0]
    x, y, w, h = ann["bbox"]
    assert boxes[0].tolist() == pytest.approx([x, y, x + w, y + h])


def test_overlapping_is_derived_from_masks_when_the_json_has_no_flag(tiny_coco, tmp_path):
    doc = json.loads((tiny_coco / "annotations" / "instances_train.json").read_text())
    for ann in doc["annotations"]:
        del ann["overlapping"]
    ann_file = tmp_path / "no_flags.json"
    ann_file.write_text(json.dumps(doc))
    ds = load(tiny_coco, ann_file=ann_file, images_dir=tiny_coco / "images")
    for i in range(len(ds)):
        _, target = ds[i]
        masks = target["masks"].numpy().astype(bool)
        covered_twice = masks.sum(0) >= 2
        expected = [(m & covered_twice).sum() >= 20 for m in masks]
        assert target["overlapping"].tolist() == expected
        assert expected[:2] == [True, True]  # the crossing pair
    strict = load(tiny_coco, ann_file=ann_file, images_dir=tiny_coco / "images", min_overlap_area=1e6)
    assert not strict[0][1]["overlapping"].any()


# ---------------------------------------------------------------- segmentation formats


def test_multi_part_polygons_and_compressed_and_uncompressed_rle(tmp_path):
    expected = np.zeros((3, H, W), dtype=np.uint8)
    expected[0, 2:8, 2:8] = 1
    expected[0, 20:26, 30:36] = 1
    expected[1, 10:20, 5:25] = 1
    expected[2, 12:28, 15:19] = 1
    compressed = rle_from_mask(expected[1])
    flat = expected[2].flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    uncompressed = {"size": [H, W], "counts": runs}
    # pycocotools rasterises [x0, x1) with vertices on pixel corners shifted by half a pixel: use x - 0.5 ... x1 - 0.5
    annotations = [
        {"image_id": 1, "segmentation": [square(1.5, 1.5, 7.5, 7.5), square(29.5, 19.5, 35.5, 25.5)]},
        {"image_id": 1, "segmentation": compressed},
        {"image_id": 1, "segmentation": uncompressed},
    ]
    write_coco(tmp_path, "train", [image_entry()], annotations)
    ds = load(tmp_path)
    masks = ds[0][1]["masks"].numpy()
    decoded_poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(annotations[0]["segmentation"], H, W)))
    np.testing.assert_array_equal(masks[0], decoded_poly)
    assert masks[0, 2:8, 2:8].all() and masks[0, 20:26, 30:36].all()
    np.testing.assert_array_equal(masks[1], expected[1])
    np.testing.assert_array_equal(masks[2], expected[2])
    assert ds[0][1]["boxes"][0].tolist() == pytest.approx(
        [np.nonzero(masks[0])[1].min(), 2, np.nonzero(masks[0])[1].max() + 1, np.nonzero(masks[0])[0].max() + 1])


def test_non_contiguous_category_ids_map_to_1_to_k(tmp_path):
    categories = [{"id": 7, "name": "y_chr"}, {"id": 3, "name": "x_chr"}, {"id": 12, "name": "marker"}]
    annotations = [{"image_id": 1, "category_id": 7, "segmentation": [square(2, 2, 9, 9)]},
                   {"image_id": 1, "category_id": 12, "segmentation": [square(20, 2, 29, 9)]},
                   {"image_id": 1, "category_id": 3, "segmentation": [square(2, 15, 9, 25)]}]
    write_coco(tmp_path, "train", [image_entry()], annotations, categories)
    ds = load(tmp_path)
    assert ds.cat_id_to_label == {3: 1, 7: 2, 12: 3}
    assert ds.label_to_cat_id == {1: 3, 2: 7, 3: 12}
    assert ds.label_names == {1: "x_chr", 2: "y_chr", 3: "marker"}
    assert ds.num_classes == 3
    assert ds[0][1]["labels"].tolist() == [2, 3, 1]


def test_images_without_annotations_stay(tmp_path):
    images = [image_entry(1), image_entry(2, width=50), image_entry(5)]
    annotations = [{"image_id": 2, "segmentation": [square(2, 2, 9, 9)]}]
    write_coco(tmp_path, "train", images, annotations)
    ds = load(tmp_path)
    assert ds.ids == [1, 2, 5]
    assert ds.aspect_ratios() == [W / H, 50 / H, W / H]
    image, target = ds[0]
    assert image.shape == (3, H, W)
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, H, W)
    assert target["labels"].shape == (0,) and target["area"].shape == (0,) and target["overlapping"].shape == (0,)
    assert target["masks"].dtype == torch.uint8 and target["labels"].dtype == torch.int64


def test_crowd_annotations_stay_in_coco_but_not_in_targets(tmp_path):
    crowd = np.zeros((H, W), dtype=np.uint8)
    crowd[20:28, 20:38] = 1
    annotations = [{"image_id": 1, "segmentation": [square(2, 2, 9, 9)]},
                   {"image_id": 1, "segmentation": rle_from_mask(crowd), "iscrowd": 1}]
    write_coco(tmp_path, "train", [image_entry()], annotations)
    ds = load(tmp_path)
    assert len(ds[0][1]["labels"]) == 1
    assert [a["iscrowd"] for a in ds.coco.loadAnns(ds.coco.getAnnIds())] == [0, 1]


# ---------------------------------------------------------------- layouts


def test_upstream_dacseg_layout_with_overlap_fields(tmp_path):
    annotations = [{"image_id": 1, "segmentation": [square(2, 2, 15, 15)],
                    "overlap": [square(10, 10, 15, 15)], "overlap_else": [square(2, 2, 9, 9)]},
                   {"image_id": 1, "segmentation": [square(10, 10, 25, 25)], "overlap": [], "overlap_else": []}]
    write_coco(tmp_path, "val", [image_entry()], annotations, ann_name="instances_overlap1_else_val2017.json",
               images_dir="imgb")
    ds = load(tmp_path, "val")
    assert ds.images_dir == tmp_path / "imgb"
    image, target = ds[0]
    assert target["masks"].shape == (2, H, W) and target["overlapping"].tolist() == [True, True]


def test_default_layout_wins_and_explicit_paths_work(tmp_path):
    write_coco(tmp_path, "train", [image_entry()], [{"image_id": 1, "segmentation": [square(2, 2, 9, 9)]}])
    other = tmp_path / "elsewhere"
    ann_file = write_coco(other, "x", [image_entry(3)], [{"image_id": 3, "segmentation": [square(2, 2, 9, 9)]}] * 1,
                          images_dir="pictures")
    ds = load(tmp_path)
    assert ds.ann_file == tmp_path / "annotations" / "instances_train.json" and ds.ids == [1]
    ds = load(tmp_path, ann_file=ann_file, images_dir=other / "pictures")
    assert ds.ids == [3] and ds[0][1]["masks"].shape[0] == 1


# ---------------------------------------------------------------- degenerate polygons


def test_degenerate_polygons_are_skipped_with_one_warning(tmp_path):
    empty = rle_from_mask(np.zeros((H, W), dtype=np.uint8))
    annotations = [
        {"image_id": 1, "segmentation": [[1, 1, 8, 8]]},  # 2 points
        {"image_id": 1, "segmentation": [[5, 5]]},  # 1 point
        {"image_id": 1, "segmentation": [[2, 2, 6, 6, 10, 10]]},  # collinear: zero area
        {"image_id": 1, "segmentation": [square(100, 100, 120, 120)]},  # outside the image
        {"image_id": 1, "segmentation": [[1, 1, 8, 8], square(2, 2, 12, 12)]},  # one bad part, one good
        {"image_id": 1, "segmentation": empty},  # empty RLE
        {"image_id": 1, "segmentation": [square(20, 5, 30, 20)]},  # fine
        {"image_id": 1, "segmentation": [[3, 20, 6, 23, 9, 26], square(2, 18, 12, 28)]},  # a zero-area part
    ]
    write_coco(tmp_path, "train", [image_entry()], annotations)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ChromosomeDataset(tmp_path, "train")
    degenerate = [w for w in caught if issubclass(w.category, DegenerateAnnotationWarning)]
    assert len(degenerate) == 1
    message = str(degenerate[0].message)
    assert "instances_train.json" in message and "skipped 7 " in message
    for part in ("fewer than 3 points: 3", "zero area: 2", "outside the image: 1", "empty mask: 1",
                 "5 annotation(s)"):
        assert part in message
    target = ds[0][1]
    assert target["masks"].shape[0] == 3
    assert target["masks"].flatten(1).sum(1).min() > 0
    # evaluation sees the same cleaned annotations
    assert sorted(ds.coco.anns) == [5, 7, 8]
    assert ds.coco.anns[5]["segmentation"] == [square(2, 2, 12, 12)]
    assert ds.coco.anns[8]["segmentation"] == [square(2, 18, 12, 28)]


# ---------------------------------------------------------------- bad input


def test_missing_image_names_the_file(tmp_path):
    write_coco(tmp_path, "train", [image_entry(4)], [], make_files=False)
    ds = load(tmp_path)
    with pytest.raises(DatasetError, match=r"img_4\.png.*image id 4"):
        ds[0]


def test_unreadable_image_names_the_file(tmp_path):
    write_coco(tmp_path, "train", [image_entry()], [], make_files=False)
    (tmp_path / "images" / "img_1.png").write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*img_1\.png") as err:
        load(tmp_path)[0]
    assert "\n" not in str(err.value)


def test_image_size_differing_from_the_json_names_the_file(tmp_path):
    write_coco(tmp_path, "train", [image_entry()], [], make_files=False)
    Image.new("L", (W + 1, H), 0).save(tmp_path / "images" / "img_1.png")
    with pytest.raises(DatasetError, match=r"img_1\.png is 41x30 but .*instances_train\.json says 40x30"):
        load(tmp_path)[0]


def test_malformed_json_names_the_file(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text('{"images": [1, 2,')
    with pytest.raises(DatasetError, match=r"malformed JSON in .*instances_train\.json: .* line 1") as err:
        load(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_split_names_both_layouts(tmp_path):
    with pytest.raises(DatasetError, match=r"split 'val'.*instances_val\.json.*instances_overlap1_else_val2017\.json"):
        load(tmp_path, "val")
    with pytest.raises(DatasetError, match=r"annotation file not found: .*nope\.json"):
        load(tmp_path, ann_file=tmp_path / "nope.json")


def test_annotation_pointing_at_unknown_image_names_both_ids(tmp_path):
    write_coco(tmp_path, "train", [image_entry()], [{"id": 17, "image_id": 99, "segmentation": [square(1, 1, 5, 5)]}])
    with pytest.raises(DatasetError, match=r"instances_train\.json: annotation 17 points at unknown image id 99"):
        load(tmp_path)


def test_a_file_without_categories_is_named(tmp_path):
    path = write_coco(tmp_path, "train", [image_entry()], [], categories=[])
    with pytest.raises(DatasetError, match=rf"{path.name} has no categories \(its \"categories\" list is empty or "):
        load(tmp_path)
    _edit_annotations(path, lambda doc: doc.pop("categories"))
    with pytest.raises(DatasetError, match="has no categories"):
        load(tmp_path)


def test_unknown_category_names_annotation_and_category(tmp_path):
    write_coco(tmp_path, "train", [image_entry()],
               [{"id": 5, "image_id": 1, "category_id": 42, "segmentation": [square(1, 1, 5, 5)]}])
    with pytest.raises(DatasetError, match=r"annotation 5 has unknown category id 42"):
        load(tmp_path)


@pytest.mark.parametrize("images, annotations, pattern", [
    ([{"id": 1, "file_name": "a.png"}], [], r"image id 1 needs \"file_name\", \"width\" and \"height\""),
    ([image_entry(), image_entry()], [], r"duplicate image id 1"),
    ([image_entry()], [{"id": 3, "image_id": 1}], r"annotation 3: no polygon or RLE"),
    ([image_entry()], [{"id": 3, "image_id": 1, "segmentation": [[1, 2, 3]]}], r"annotation 3: a polygon must be"),
    ([image_entry()], [{"id": 3, "image_id": 1, "segmentation": [[1, 2, 1e9, 2, 3, 9]]}],
     r"annotation 3: a polygon point is not finite or lies far outside the 40x30 image"),
    ([image_entry()], [{"id": 3, "image_id": 1, "segmentation": {"size": [5, 5], "counts": "00"}}],
     r"annotation 3: RLE size \[5, 5\] does not match the image size \[30, 40\]"),
])
def test_malformed_entries_name_the_id(tmp_path, images, annotations, pattern):
    write_coco(tmp_path, "train", images, annotations, make_files=False)
    with pytest.raises(DatasetError, match=pattern):
        load(tmp_path)


def _edit_annotations(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_annotation_ids_must_exist_and_be_unique(tmp_path):
    """pycocotools indexes annotations by id: a missing id was a KeyError, a duplicate one a silently wrong AP."""
    anns = [{"image_id": 1, "segmentation": [square(1, 1, 9, 9)]}, {"image_id": 1, "segmentation": [square(20, 5, 30, 15)]}]
    path = write_coco(tmp_path, "train", [image_entry()], anns)
    _edit_annotations(path, lambda doc: doc["annotations"][1].pop("id"))
    with pytest.raises(DatasetError, match=r"annotation number 2 \(image id 1\) has no integer \"id\""):
        load(tmp_path)
    _edit_annotations(path, lambda doc: doc["annotations"][1].update(id=1))
    with pytest.raises(DatasetError, match=r"duplicate annotation id 1 "):
        load(tmp_path)


def test_the_mask_decides_box_and_area_and_a_disagreeing_file_is_named(tmp_path):
    anns = [{"image_id": 1, "segmentation": [square(2, 2, 12, 8)], "bbox": [2, 2, 10, 6], "area": 60.0},
            {"image_id": 1, "segmentation": [square(20, 5, 30, 15)], "bbox": [0, 0, 40, 30], "area": 5.0}]
    write_coco(tmp_path, "train", [image_entry()], anns)
    with pytest.warns(UserWarning, match=r"instances_train\.json: 1 annotation\(s\) have a \"bbox\" or \"area\" that "
                                        r"disagrees with their mask"):
        dataset = load(tmp_path)
    for ann in dataset.coco.loadAnns(dataset.coco.getAnnIds()):
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], H, W))
        assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(rle)]
        assert ann["area"] == float(mask_utils.area(rle))
    assert dataset.coco.loadAnns(2)[0]["bbox"] == [20.0, 5.0, 10.0, 10.0]


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "sub/../../x.png"])
def test_file_names_stay_inside_the_images_folder(tmp_path, name):
    write_coco(tmp_path, "train", [{**image_entry(), "file_name": name}], [], make_files=False)
    with pytest.raises(DatasetError, match=r"points outside .*images; file names are relative to it"):
        load(tmp_path)


def test_num_instances_counts_what_training_sees(tmp_path):
    path = write_coco(tmp_path, "train", [image_entry()], [{"image_id": 1, "segmentation": [square(1, 1, 9, 9)]}])
    assert load(tmp_path).num_instances == 1
    _edit_annotations(path, lambda doc: doc.pop("annotations"))
    assert load(tmp_path).num_instances == 0


# ---------------------------------------------------------------- images


def _png16_rgb(path: Path, array: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_read_image_8_bit_grey_rgb_rgba_palette_jpeg(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "grey.png")
    out = read_image(tmp_path / "grey.png")
    assert out.shape == (3, 3, 4) and out.dtype == torch.float32
    assert torch.equal(out[0], out[2]) and out[0].flatten().tolist() == pytest.approx((grey / 255).flatten().tolist())

    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 7
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (3, 3, 4) and out[0].eq(1).all() and out[1:].eq(0).all()

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([0, 0, 255, 255, 255, 0])
    palette.save(tmp_path / "palette.png")
    out = read_image(tmp_path / "palette.png")
    assert out[:, 0, 0].tolist() == [0, 0, 1] and out[:, 0, 1].tolist() == [1, 1, 0]

    Image.new("RGB", (16, 8), (200, 100, 50)).save(tmp_path / "rgb.jpg", quality=95)
    out = read_image(tmp_path / "rgb.jpg")
    assert out.shape == (3, 8, 16)
    assert out[:, 4, 8].tolist() == pytest.approx([200 / 255, 100 / 255, 50 / 255], abs=0.02)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_read_image_16_bit_grey_uses_its_real_range(tmp_path, suffix):
    array = np.array([[1000, 1500], [2000, 3000]], dtype=np.uint16)  # a 12-bit camera: divided by 65535 looks black
    Image.fromarray(array).save(tmp_path / f"g16{suffix}")
    out = read_image(tmp_path / f"g16{suffix}")
    assert out.shape == (3, 2, 2)
    assert out[0].flatten().tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])


def test_read_image_16_bit_rgb_png_keeps_its_low_bits(tmp_path):
    array = np.zeros((2, 3, 3), dtype=np.uint16)
    array[0, 0] = (100, 200, 300)  # all below 256: Pillow would make this black
    array[1, 2] = (400, 400, 400)
    _png16_rgb(tmp_path / "rgb16.png", array)
    out = read_image(tmp_path / "rgb16.png")
    assert out[:, 0, 0].tolist() == pytest.approx([0.25, 0.5, 0.75]) and out[:, 1, 2].tolist() == [1, 1, 1]


@pytest.mark.parametrize("layout", ["interleaved", "planar", "lzw"])
def test_read_image_16_bit_rgb_tiff_keeps_its_low_bits(tmp_path, layout):
    """Pillow reads 16-bit colour TIFFs as 8 bits (these values would all be black); tifffile keeps them."""
    import tifffile

    array = np.zeros((2, 3, 3), dtype=np.uint16)
    array[0, 0] = (100, 200, 300)
    array[1, 2] = (400, 400, 400)
    path = tmp_path / f"rgb16_{layout}.tif"
    if layout == "planar":
        tifffile.imwrite(path, np.moveaxis(array, -1, 0), photometric="rgb", planarconfig="separate")
    else:
        tifffile.imwrite(path, array, photometric="rgb", compression="lzw" if layout == "lzw" else None)
    out = read_image(path)
    assert out.shape == (3, 2, 3)
    assert out[:, 0, 0].tolist() == pytest.approx([0.25, 0.5, 0.75]) and out[:, 1, 2].tolist() == [1, 1, 1]
    assert image_size(path) == (3, 2)


def test_read_image_12_bit_grey_tiff_and_palette_tiff(tmp_path):
    import tifffile

    grey = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)  # a 12-bit camera in a 16-bit file
    tifffile.imwrite(tmp_path / "g12.tif", grey, compression="zlib")
    assert read_image(tmp_path / "g12.tif")[1].flatten().tolist() == pytest.approx([0, 1024 / 4095, 2048 / 4095, 1])
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([0, 0, 255, 255, 255, 0])
    palette.save(tmp_path / "palette.tif")
    assert read_image(tmp_path / "palette.tif")[:, 0, 1].tolist() == [1, 1, 0]


@pytest.mark.parametrize("planar", [True, False])
def test_a_tiff_of_many_channels_uses_its_first_three_and_one_of_two_its_first(tmp_path, planar):
    """The rule the README states next to the 2-channel one: 5 fluorescence channels become the RGB of the first
    three (the model sees three), 2 become the first as grey."""
    import tifffile

    planes = np.stack([np.full((2, 3), 10 * (k + 1), dtype=np.uint8) for k in range(5)])
    for count in (5, 2):
        path = tmp_path / f"c{count}.tif"
        data = planes[:count] if planar else np.moveaxis(planes[:count], 0, -1)
        tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate" if planar else "contig")
        expected = [10, 20, 30] if count == 5 else [10, 10, 10]
        assert read_image(path).mul(255).round()[:, 1, 2].tolist() == expected and image_size(path) == (3, 2)


def test_read_image_grey_and_multi_page_tiff(tmp_path):
    first = Image.fromarray(np.full((4, 5), 60, dtype=np.uint8))
    second = Image.fromarray(np.full((4, 5), 250, dtype=np.uint8))
    first.save(tmp_path / "pages.tif", save_all=True, append_images=[second])
    with Image.open(tmp_path / "pages.tif") as img:
        assert img.n_frames == 2
    out = read_image(tmp_path / "pages.tif")
    assert out.shape == (3, 4, 5) and out.sub(60 / 255).abs().max() < 1e-6


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"image not found: .*nothing\.png"):
        read_image(tmp_path / "nothing.png")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DatasetError, match=r"cannot read image .*junk\.tif"):
        read_image(tmp_path / "junk.tif")


def test_dataset_reads_16_bit_tiff_images(tmp_path):
    write_coco(tmp_path, "train", [dict(image_entry(), file_name="a.tif")],
               [{"image_id": 1, "segmentation": [square(2, 2, 9, 9)]}], make_files=False)
    array = np.full((H, W), 4000, dtype=np.uint16)
    array[2:9, 2:9] = 12000
    Image.fromarray(array).save(tmp_path / "images" / "a.tif")
    image, target = load(tmp_path)[0]
    assert image.max() == 1.0 and image.min() == 0.0 and image[0, 5, 5] == 1.0


# ---------------------------------------------------------------- label JSON


def test_label_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "labels.json"
    save_label_json({2: "b", 1: "a"}, path)
    assert json.loads(path.read_text()) == {"1": "a", "2": "b"}
    assert load_label_json(path) == {1: "a", 2: "b"}
    path.write_text('{"1": "a", "3": "c"}')
    with pytest.raises(DatasetError, match=r"labels\.json must number its labels 1\.\.2"):
        load_label_json(path)
    path.write_text('{"x": "a"}')
    with pytest.raises(DatasetError, match=r"labels\.json has a key that is not an integer"):
        load_label_json(path)
    path.write_text("{")
    with pytest.raises(DatasetError, match=r"malformed JSON in .*labels\.json"):
        load_label_json(path)
    with pytest.raises(DatasetError, match=r"label JSON not found: .*gone\.json"):
        load_label_json(tmp_path / "gone.json")


def test_dataset_label_names_round_trip_through_label_json(tmp_path, tiny_coco):
    ds = load(tiny_coco)
    save_label_json(ds.label_names, tmp_path / "l.json")
    assert load_label_json(tmp_path / "l.json") == ds.label_names == {1: "chromosome"}
