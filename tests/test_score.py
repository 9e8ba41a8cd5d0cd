"""evaluation.score: evaluation through the real COCO pipeline with oracle, empty and imperfect predictions, on one
process and two."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from my_dataset_chromosome import ChromosomeDataset
from train_utils.evaluation import score
from train_utils.data.loaders import collate_fn
from train_utils.data.samplers import ShardSampler
from train_utils.outputs import results
from transforms import get_transform



class Oracle(nn.Module):
    """Answers each image, in loader order, with the given outputs (eval mode only)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images, targets=None):
        assert not self.training
        return [self.outputs.pop(0) for _ in images]


@pytest.fixture(scope="module")
def val_ds(tiny_coco):
    return ChromosomeDataset(tiny_coco, "val", transforms=get_transform("none", train=False))


def _loader(ds):
    return DataLoader(ds, batch_size=1, sampler=ShardSampler(len(ds)), collate_fn=collate_fn)


def _ground_truth_outputs(ds):
    outputs = []
    for i in range(len(ds)):
        _, target = ds[i]
        n = len(target["labels"])
        outputs.append({"boxes": target["boxes"].as_subclass(torch.Tensor).float(), "labels": target["labels"],
                        "scores": torch.ones(n), "masks": target["masks"].as_subclass(torch.Tensor)[:, None].float()})
    return outputs


def _evaluate(model, ds):
    return score.evaluate(model, _loader(ds), torch.device("cpu"), ds.coco, ds.label_to_cat_id, 0.5,
                           label_names=ds.label_names)


def test_evaluate_oracle_predictions_score_one(val_ds):
    record = _evaluate(Oracle(_ground_truth_outputs(val_ds)), val_ds)
    assert record["segm"]["AP"] == pytest.approx(1.0) and record["bbox"]["AP"] > 0.9
    assert record["precision"] == record["recall"] == record["f1"] == pytest.approx(1.0)
    assert record["segm"]["per_class_AP50"] == {"chromosome": pytest.approx(1.0)}
    assert record["count_mae"] == 0


def test_evaluate_with_zero_predictions(val_ds):
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 128, 160)}
    record = _evaluate(Oracle([dict(empty) for _ in range(len(val_ds))]), val_ds)
    assert len(record["segm"]["stats"]) == len(record["bbox"]["stats"]) == 12
    assert record["segm"]["AP"] == 0.0 and record["recall"] == 0 and record["count_mae"] == 4
    line = results.format_epoch_line(0, record["segm"]["stats"], 1.0, 0.02)
    assert line.startswith("epoch:0 ") and len(line.split("  ")) == 14


class ContentOracle(nn.Module):
    """Recognises each image by its pixel sum and answers with imperfect predictions: every ground-truth instance
    but the last (score 0.9), plus a shifted false positive (score 0.7) — so AP is neither 0 nor 1."""

    def __init__(self, ds):
        super().__init__()
        self.answers = {}
        for i in range(len(ds)):
            image, target = ds[i]
            masks = target["masks"].as_subclass(torch.Tensor)
            n = len(masks) - 1
            wrong = torch.roll(masks[:1], shifts=(9, 9), dims=(1, 2))
            all_masks = torch.cat([masks[:n], wrong])
            boxes = torch.cat([target["boxes"].as_subclass(torch.Tensor)[:n], target["boxes"][:1] + 9])
            self.answers[round(float(image.sum()), 2)] = {
                "boxes": boxes.float(), "labels": torch.ones(n + 1, dtype=torch.int64),
                "scores": torch.tensor([0.9] * n + [0.7]), "masks": all_masks[:, None].float()}

    def forward(self, images, targets=None):
        return [dict(self.answers[round(float(image.sum()), 2)]) for image in images]


def _evaluate_shard(rank: int, world: int, init_file: str, root: str, out: str) -> None:
    """One process of a gloo group: evaluate this rank's shard; process 0 writes the record."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = ChromosomeDataset(root, "val", transforms=get_transform("none", train=False))
        loader = DataLoader(ds, batch_size=1, sampler=ShardSampler(len(ds), world, rank),
                            collate_fn=collate_fn)
        record = score.evaluate(ContentOracle(ds), loader, torch.device("cpu"), ds.coco, ds.label_to_cat_id,
                                 label_names=ds.label_names)
        Path(out, f"record_{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def test_distributed_evaluate_equals_one_process(tmp_path):
    """Two gloo processes, uneven shards (3 images): the gathered record equals a one-process evaluation."""
    import json

    import torch.multiprocessing as mp
    from conftest import make_tiny_coco

    make_tiny_coco(tmp_path, "val", 3, seed=5)
    ds = ChromosomeDataset(tmp_path, "val", transforms=get_transform("none", train=False))
    single = _evaluate(ContentOracle(ds), ds)
    assert 0.2 < single["segm"]["AP"] < 0.95 and single["num_detections"] == 12
    mp.spawn(_evaluate_shard, args=(2, str(tmp_path / "init"), str(tmp_path), str(tmp_path)), nprocs=2)
    for rank in range(2):  # every process returns the same record
        record = json.loads((tmp_path / f"record_{rank}.json").read_text())
        assert record == json.loads(json.dumps(single))


def test_the_callers_autocast_reaches_the_model(val_ds):
    """Evaluation under --amp runs the network in the autocast dtype (inference.detect must not switch it off)."""
    from network_files import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", min_size=128, max_size=160, trainable_layers=0,
                                    norm_layer="frozen_bn", box_detections_per_img=5))
    seen = []
    model.backbone.body.conv1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    for amp_dtype in (torch.bfloat16, None):
        score.evaluate(model, _loader(val_ds), torch.device("cpu"), val_ds.coco, val_ds.label_to_cat_id,
                       amp_dtype=amp_dtype)
    assert seen == [torch.bfloat16] * len(val_ds) + [torch.float32] * len(val_ds)
