"""outputs.predictions: COCO results entries, predictions.json (one result a line, whole after every image) and
images.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from train_utils.masks import BoxMasks
from train_utils.outputs.predictions import ImagesIndex, PredictionsWriter, box_mask_rle, outputs_to_coco_results


def test_outputs_become_coco_entries_with_rle_masks():
    masks = torch.zeros(2, 1, 20, 30)
    masks[0, 0, 2:6, 3:10] = 0.9
    masks[1, 0, 10:20, 0:5] = 0.4  # below the 0.5 mask threshold: an empty mask
    output = {"boxes": torch.tensor([[3.0, 2.0, 10.0, 6.0], [0.0, 10.0, 5.0, 20.0]]),
              "scores": torch.tensor([0.91, 0.3]), "labels": torch.tensor([1, 2]), "masks": masks,
              "overlap_scores": torch.tensor([0.8, 0.1])}
    results = outputs_to_coco_results([output], [7], {1: 10, 2: 20})
    assert [r["category_id"] for r in results] == [10, 20] and {r["image_id"] for r in results} == {7}
    assert results[0]["bbox"] == [3.0, 2.0, 7.0, 4.0] and results[0]["score"] == 0.91
    assert results[0]["overlap_score"] == 0.8
    first = dict(results[0]["segmentation"], counts=results[0]["segmentation"]["counts"].encode())
    assert results[0]["segmentation"]["size"] == [20, 30] and mask_utils.area(first) == 4 * 7
    second = dict(results[1]["segmentation"], counts=results[1]["segmentation"]["counts"].encode())
    assert mask_utils.area(second) == 0


def test_no_detections_and_box_only_outputs():
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 1, 5, 5)}
    boxes_only = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "scores": torch.tensor([0.5]),
                  "labels": torch.tensor([1])}
    results = outputs_to_coco_results([empty, boxes_only], [1, 2], {1: 1})
    assert len(results) == 1 and results[0]["image_id"] == 2
    assert "segmentation" not in results[0] and "overlap_score" not in results[0]


def test_predictions_json_has_one_result_per_line(tmp_path):
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.9,
         "segmentation": {"size": [4, 5], "counts": "abc"}, "overlap_score": 0.25},
        {"image_id": 2, "category_id": 3, "bbox": [0.5, 0.0, 1.0, 1.0], "score": 0.5},
    ]
    path = tmp_path / "predictions.json"
    writer = PredictionsWriter(path)
    writer.add(results[:1])
    writer.add([])  # an image without detections
    writer.add(results[1:])
    writer.close()
    assert path.read_text() == (
        '[\n'
        '{"image_id": 1, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.9, '
        '"segmentation": {"size": [4, 5], "counts": "abc"}, "overlap_score": 0.25},\n'
        '{"image_id": 2, "category_id": 3, "bbox": [0.5, 0.0, 1.0, 1.0], "score": 0.5}\n'
        ']\n'
    )
    assert json.loads(path.read_text()) == results
    PredictionsWriter(path).close()
    assert path.read_text() == "[]\n"


def test_predictions_writer_leaves_a_whole_json_file_after_every_image(tmp_path):
    path = tmp_path / "predictions.json"
    writer = PredictionsWriter(path)
    assert json.loads(path.read_text()) == []
    seen = []
    for image_id, count in [(1, 2), (2, 0), (3, 1)]:
        batch = [{"image_id": image_id, "score": 0.5 + k / 10} for k in range(count)]
        writer.add(batch)
        seen += batch
        assert json.loads(path.read_text()) == seen  # readable at every step, not only after close
    writer.close()
    assert path.read_text().count("\n") == len(seen) + 2


def test_images_json_is_whole_after_every_image_and_failure(tmp_path):
    path = tmp_path / "images.json"
    index = ImagesIndex(path, {1: "chromosome"}, {1: 7})
    assert json.loads(path.read_text()) == {"images": [], "categories": [{"id": 7, "name": "chromosome"}],
                                            "failed": []}
    index.add({"id": 1, "file_name": "/a.png", "num_detections": 3})
    index.fail(2, Path(tmp_path / "b.png"), "cannot read image b.png: truncated")
    doc = json.loads(path.read_text())
    assert doc["images"] == [{"id": 1, "file_name": "/a.png", "num_detections": 3}]
    assert doc["failed"] == [{"id": 2, "file_name": str((tmp_path / "b.png").resolve()),
                              "error": "cannot read image b.png: truncated"}]
    assert not list(tmp_path.glob("*.tmp"))


def test_box_masks_encode_to_the_rle_of_the_pasted_mask_byte_for_byte():
    """Each mask is encoded from its box, without an image-sized array: the same RLE as pycocotools' encode of the
    mask pasted into the image, at every edge, empty and full."""
    rng = np.random.default_rng(0)
    height, width = 37, 53
    regions = [(0, 0, width, height), (0, 0, 0, 0), (3, 4, 3, 9), (width - 1, height - 1, width, height)]
    for _ in range(300):
        (x0, x1), (y0, y1) = sorted(rng.integers(0, width + 1, 2)), sorted(rng.integers(0, height + 1, 2))
        regions.append((int(x0), int(y0), int(x1), int(y1)))
    for x0, y0, x1, y1 in regions:
        patch = rng.random((y1 - y0, x1 - x0)) < rng.choice([0.0, 0.5, 1.0])
        full = np.zeros((height, width), dtype=np.uint8)
        full[y0:y1, x0:x1] = patch
        want = mask_utils.encode(np.asfortranarray(full[:, :, None]))[0]
        got = box_mask_rle(patch, (x0, y0, x1, y1), (height, width))
        assert got["counts"] == want["counts"] and list(got["size"]) == [height, width], (x0, y0, x1, y1)


def test_box_masks_and_image_sized_masks_give_the_same_entries():
    masks = torch.zeros(2, 1, 20, 30)
    masks[0, 0, 2:6, 3:10] = 0.9
    masks[1, 0, 10:20, 25:30] = 0.7
    output = {"boxes": torch.tensor([[3.0, 2.0, 10.0, 6.0], [25.0, 10.0, 30.0, 20.0]]),
              "scores": torch.tensor([0.91, 0.3]), "labels": torch.tensor([1, 1]), "masks": masks}
    boxed = {**output, "masks": BoxMasks.from_full(masks)}
    assert outputs_to_coco_results([boxed], [7], {1: 1}) == outputs_to_coco_results([output], [7], {1: 1})
