"""train_utils/outputs/exports.py: the predictions as labelme, ImageJ, QuPath GeoJSON and COCO outlines. Each is
read back the way its users read it (our labelme converter, roifile, GeoJSON polygons, the dataset) and must give
the predicted masks again, crossings included."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from my_dataset_chromosome import ChromosomeDataset
from test_outlines import bar_mask, rasterise
from tools.labelme2coco import convert_labelme
from train_utils.outputs.exports import EXPORT_FORMATS, ExportImage, Exporter, export_paths, labelme_doc
from train_utils.outputs.outlines import detection_outlines

roifile = pytest.importorskip("roifile")

H, W = 96, 128
NAMES, TO_CAT = {1: "chromosome"}, {1: 1}


def two_pieces() -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[70:77, 90:104] = True
    mask[82:88, 108:122] = True
    return mask


def crossing_pair() -> list[np.ndarray]:
    return [bar_mask(40, 48, 60, 10, 30, size=(W, H)), bar_mask(40, 48, 55, 10, 120, size=(W, H))]


def prediction(masks: list[np.ndarray], scores: list[float], overlap: list[float] | None = None) -> dict:
    """A model output: ``[N, 1, H, W]`` bool masks, as ``predict.py`` has them after pasting."""
    stacked = torch.from_numpy(np.stack(masks))[:, None] if masks else torch.zeros(0, 1, H, W, dtype=torch.bool)
    output = {"boxes": torch.zeros(len(masks), 4), "labels": torch.ones(len(masks), dtype=torch.int64),
              "scores": torch.tensor(scores, dtype=torch.float32), "masks": stacked}
    if overlap is not None:
        output["overlap_scores"] = torch.tensor(overlap, dtype=torch.float32)
    return output


def cell_masks() -> list[np.ndarray]:
    """Two crossing chromosomes, a free one, and a detection whose mask came out in two pieces."""
    return [*crossing_pair(), bar_mask(100, 30, 30, 8, 80, size=(W, H)), two_pieces()]


def export(tmp_path: Path, masks: list[np.ndarray], formats=EXPORT_FORMATS, scores=None, overlap=None) -> Path:
    """Write the image and export its prediction in ``formats`` into ``tmp_path / "out"``."""
    image_path = tmp_path / "slides" / "cell.png"
    image_path.parent.mkdir(exist_ok=True)
    Image.new("L", (W, H), 30).save(image_path)
    scores = scores if scores is not None else [0.95, 0.8, 0.65, 0.55][:len(masks)]
    outlines = detection_outlines(prediction(masks, scores, overlap), NAMES, TO_CAT, review_below=0.7)
    out = tmp_path / "out"
    Exporter(out, formats, NAMES, TO_CAT).add(ExportImage(image_path, "cell", 1, W, H), outlines)
    return out


def read_back(fmt: str, out: Path, tmp_path: Path) -> list[np.ndarray]:
    """The masks, one per detection in order, as the format's readers see them."""
    paths = export_paths(out, "cell")
    if fmt == "labelme":  # through our own converter and the dataset, the way a corrected folder is trained on
        convert_labelme([out / "labelme"], tmp_path / "relabelled", "val")
        _, target = ChromosomeDataset(tmp_path / "relabelled", "val")[0]
        return [m.numpy().astype(bool) for m in target["masks"]]
    if fmt == "coco":  # the dataset reads the export as it is
        _, target = ChromosomeDataset(out, "predicted")[0]
        return [m.numpy().astype(bool) for m in target["masks"]]
    if fmt == "imagej":
        rois = roifile.roiread(paths["imagej"])
        return [rasterise([np.asarray(c, dtype=float) for c in roi.coordinates(multi=True)], H, W) for roi in rois]
    doc = json.loads(paths["geojson"].read_text())
    masks = []
    for feature in doc["features"]:
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        masks.append(rasterise([np.asarray(rings[0][:-1], dtype=float) for rings in polygons], H, W))
    return masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_round_trip_gives_the_predicted_masks_with_overlaps_kept(fmt, tmp_path):
    masks = cell_masks()
    back = read_back(fmt, export(tmp_path, masks, [fmt]), tmp_path)
    assert len(back) == len(masks)
    assert all(iou(a, b) >= 0.95 for a, b in zip(masks, back)), [iou(a, b) for a, b in zip(masks, back)]
    crossing = (masks[0] & masks[1]).sum()
    assert crossing > 50 and (back[0] & back[1]).sum() >= 0.95 * crossing


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_two_crossing_bars_survive_as_two_overlapping_outlines(fmt, tmp_path):
    masks = crossing_pair()
    back = read_back(fmt, export(tmp_path, masks, [fmt], scores=[0.9, 0.9]), tmp_path)
    assert len(back) == 2
    assert iou(back[0], masks[0]) >= 0.95 and iou(back[1], masks[1]) >= 0.95
    assert iou(back[0] & back[1], masks[0] & masks[1]) >= 0.95  # both keep the whole crossing


def test_zero_detections_give_valid_empty_files(tmp_path):
    out = export(tmp_path, [], EXPORT_FORMATS, scores=[])
    paths = export_paths(out, "cell")
    doc = json.loads(paths["labelme"].read_text())
    assert doc["shapes"] == [] and (doc["imageWidth"], doc["imageHeight"]) == (W, H)
    assert roifile.roiread(paths["imagej"]) == []
    assert json.loads(paths["geojson"].read_text()) == {"type": "FeatureCollection", "features": []}
    dataset = ChromosomeDataset(out, "predicted")
    assert len(dataset) == 1 and dataset.num_instances == 0
    assert len(dataset[0][1]["masks"]) == 0


def test_labelme_layout_flags_and_the_pieces_of_one_detection(tmp_path):
    out = export(tmp_path, cell_masks(), ["labelme"], overlap=[0.9, 0.8, 0.1, 0.2])
    doc = json.loads(export_paths(out, "cell")["labelme"].read_text())
    assert list(doc) == ["version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"]
    assert doc["imagePath"] == "../../slides/cell.png" and doc["imageData"] is None
    assert (out / "labelme" / doc["imagePath"]).resolve() == (tmp_path / "slides" / "cell.png").resolve()
    shapes = doc["shapes"]
    assert len(shapes) == 5  # the two-piece detection is two polygons
    assert all(list(s) == ["label", "points", "group_id", "description", "shape_type", "flags"] for s in shapes)
    assert all(s["label"] == "chromosome" and s["shape_type"] == "polygon" for s in shapes)
    assert [s["description"] for s in shapes[:2]] == ["#1 score=0.9500 overlap_score=0.9000",
                                                      "#2 score=0.8000 overlap_score=0.8000"]
    assert [s["flags"] for s in shapes[:3]] == [{"review": False, "overlapping": True},
                                                {"review": False, "overlapping": True},
                                                {"review": True, "overlapping": False}]
    assert [s["group_id"] for s in shapes] == [None, None, None, 4, 4]  # labelme2coco joins a group again
    assert shapes[3]["description"] == shapes[4]["description"] == "#4 score=0.5500 overlap_score=0.2000"


def test_imagej_rois_are_named_by_number_with_score_properties(tmp_path):
    out = export(tmp_path, cell_masks(), ["imagej"], overlap=[0.9, 0.8, 0.1, 0.2])
    rois = roifile.roiread(export_paths(out, "cell")["imagej"])
    assert [roi.name for roi in rois] == ["1", "2", "3", "4"]
    assert [roi.roitype for roi in rois[:3]] == [roifile.ROI_TYPE.POLYGON] * 3 and rois[3].composite
    assert rois[0].properties == {"class": "chromosome", "score": 0.95, "review": False, "overlap_score": 0.9}
    assert rois[2].properties["review"] is True


def test_geojson_features_are_qupath_annotations_with_class_and_score(tmp_path):
    out = export(tmp_path, cell_masks(), ["geojson"])
    features = json.loads(export_paths(out, "cell")["geojson"].read_text())["features"]
    assert [f["geometry"]["type"] for f in features] == ["Polygon"] * 3 + ["MultiPolygon"]
    first = features[0]["properties"]
    assert first == {"objectType": "annotation", "name": "1", "classification": {"name": "chromosome"},
                     "isLocked": False, "review": False, "measurements": {"score": 0.95}}
    ring = features[0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]  # GeoJSON rings are closed


def test_coco_export_is_the_dataset_layout_with_scores(tmp_path):
    out = export(tmp_path, cell_masks(), ["coco"], overlap=[0.9, 0.8, 0.1, 0.2])
    doc = json.loads((out / "annotations" / "instances_predicted.json").read_text())
    assert {"images", "annotations", "categories", "licenses", "info"} <= set(doc)  # CVAT wants "licenses"
    assert doc["images"] == [{"id": 1, "file_name": "cell.png", "width": W, "height": H}]
    assert (out / "images" / "cell.png").read_bytes() == (tmp_path / "slides" / "cell.png").read_bytes()
    assert doc["categories"] == [{"id": 1, "name": "chromosome"}]
    assert [len(a["segmentation"]) for a in doc["annotations"]] == [1, 1, 1, 2]
    assert [a["score"] for a in doc["annotations"]] == [0.95, 0.8, 0.65, 0.55]
    assert doc["annotations"][0]["overlap_score"] == 0.9 and doc["annotations"][3]["area"] == 7 * 14 + 6 * 14


def test_unknown_formats_are_refused_and_an_unreachable_image_path_is_absolute(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown export format.*tiff"):
        Exporter(tmp_path, ["labelme", "tiff"], NAMES, TO_CAT)
    monkeypatch.setattr("os.path.relpath", lambda *a: (_ for _ in ()).throw(ValueError("path is on mount 'D:'")))
    doc = labelme_doc([], ExportImage(tmp_path / "x.png", "x", 1, W, H), tmp_path / "out")
    assert doc["imagePath"] == (tmp_path / "x.png").resolve().as_posix()
