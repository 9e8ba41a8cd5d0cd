"""Model outputs to COCO results entries."""
from __future__ import annotations

import torch
from pycocotools import mask as mask_utils

from train_utils.outputs.predictions import outputs_to_coco_results


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
