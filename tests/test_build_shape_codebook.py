"""The shape codebook builder: crops as the mask targets, quarter turns and flips, k-means, the autoencoder learning
synthetic chromosome masks, and the files it writes."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from my_dataset_chromosome import ChromosomeDataset
from network_files.shape_prior import MASK_SIZE, read_codebook
from tools import build_shape_codebook as tool
from tools.synth_metaphase import SynthConfig, generate


@pytest.fixture(scope="module")
def synthetic_crops(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask crops of three small synthetic spreads (train, 138 crops) and of a fourth one (held back, 46)."""
    root = tmp_path_factory.mktemp("synth")
    small = SynthConfig(width=384, height=288)
    generate(root, 3, split="train", seed=0, config=small)
    generate(root, 1, split="val", seed=1, config=small)
    return tool.mask_crops(ChromosomeDataset(root, "train"))[0], tool.mask_crops(ChromosomeDataset(root, "val"))[0]


def test_the_autoencoder_learns_synthetic_chromosome_masks(synthetic_crops):
    """Reconstruction IoU on another spread's crops after 10 short epochs (90 steps, about a second). Calibrated on
    seeds 0-2: 0.90-0.91 after 10 epochs, 0.85 after 5, and 0.50 after one, where it still outputs an all-filled box
    (which scores 0.49 on these crops)."""
    train, held_back = synthetic_crops
    assert len(train) >= 100 and len(held_back) >= 30
    autoencoder = tool.train_autoencoder(train, epochs=10, batch_size=16, lr=3e-3, seed=0, log=lambda _: None)
    assert tool.reconstruction_iou(autoencoder, held_back) > 0.85


def test_crops_are_the_mask_targets_of_the_instance_boxes(tiny_coco):
    crops, labels = tool.mask_crops(ChromosomeDataset(tiny_coco, "train"))
    assert crops.shape == (16, MASK_SIZE, MASK_SIZE) and labels.tolist() == [1] * 16  # 4 images of 4 bars
    assert crops.min() >= 0 and crops.max() <= 1
    assert (crops[:, MASK_SIZE // 2, MASK_SIZE // 2] > 0.5).all()  # a bar runs through the middle of its box


def test_quarter_turns_and_flips():
    shape = torch.zeros(1, 4, 4)
    shape[0, 0, :3] = 1  # an L: no two of its 8 orientations are alike
    shape[0, 1, 0] = 1
    every = tool.all_dihedral(shape)
    assert len({tuple(m.flatten().tolist()) for m in every}) == 8
    random = tool.random_dihedral(shape.expand(64, 4, 4), torch.Generator().manual_seed(0))
    seen = {tuple(m.flatten().tolist()) for m in random}
    assert seen <= {tuple(m.flatten().tolist()) for m in every} and len(seen) > 4


def test_kmeans_finds_hand_made_clusters():
    generator = torch.Generator().manual_seed(0)
    truth = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(20 + 10 * i, 2, generator=generator) for i, c in enumerate(truth)])
    centres, sizes = tool.kmeans(points, 3, seed=1)
    order = torch.cdist(truth, centres).argmin(dim=1)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(centres[order], truth, atol=0.1) and sizes[order].tolist() == [20, 30, 40]
    with pytest.raises(ValueError, match="need at least as many points"):
        tool.kmeans(points[:2], 3)


def test_main_writes_the_codebook_and_its_picture(tiny_coco, tmp_path, capsys):
    out = tmp_path / "codebook.pt"
    assert tool.main(["--data-path", str(tiny_coco), "--out", str(out), "--k", "4", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "16 instance crops of 4 images" in printed and "epoch 1/1: loss" in printed and f"wrote {out}" in printed
    codebook = read_codebook(out, num_classes=1)
    assert codebook.centres.shape == (1, 4, 128) and codebook.counts.sum() == 16 * 8
    assert codebook.settings["split"] == "train" and codebook.settings["class_names"] == ["chromosome"]
    picture = Image.open(out.with_suffix(".png"))
    assert picture.size == (4 * (3 * MASK_SIZE + 2) + 2, 3 * MASK_SIZE + 4)

    assert tool.main(["--data-path", str(tiny_coco), "--out", str(out), "--k", "200", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["build_shape_codebook.py: error: class 1 has 16 instance(s), 128 crops in "
                                        "all orientations: fewer than --k 200"]
