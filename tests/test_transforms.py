from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from my_dataset_chromosome import ChromosomeDataset
from transforms import PRESETS, RandomGamma, get_transform, tighten_instances

H, W = 96, 128
SIDES = (5, 9, 15, 25)  # square sides: each area more than twice the previous, so the order survives scale jitter
BACKGROUND, FOREGROUND = 0.1, 0.8


def make_sample(with_instances: bool = True) -> tuple[tv_tensors.Image, dict]:
    """Squares of distinct sizes inside the central region; labels 1..4; 2 and 4 cross (15 px), so they are the
    overlapping ones."""
    image = torch.full((3, H, W), BACKGROUND)
    masks = torch.zeros((len(SIDES), H, W), dtype=torch.uint8)
    corners = [(34, 30), (60, 42), (34, 50), (66, 46)]
    for k, (side, (x, y)) in enumerate(zip(SIDES, corners)):
        masks[k, y:y + side, x:x + side] = 1
        image[:, y:y + side, x:x + side] = FOREGROUND
    if not with_instances:
        masks = masks[:0]
    n = masks.shape[0]
    labels = torch.arange(1, n + 1, dtype=torch.int64)
    boxes = torch.tensor([[x, y, x + s, y + s] for s, (x, y) in zip(SIDES, corners)][:n], dtype=torch.float32)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes.reshape(-1, 4), format="XYXY", canvas_size=(H, W)),
        "masks": tv_tensors.Mask(masks),
        "labels": labels,
        "image_id": 7,
        "area": masks.flatten(1).sum(1).float(),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "overlapping": labels % 2 == 0,
    }
    return tv_tensors.Image(image), target


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def check_consistent(image: torch.Tensor, target: dict) -> None:
    """Types, dtypes, per-instance keys in step, boxes = tight box of their masks (within 1 px)."""
    masks, boxes = target["masks"], target["boxes"]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32
    assert tuple(boxes.canvas_size) == tuple(masks.shape[-2:]) == tuple(image.shape[-2:])
    n = masks.shape[0]
    for key in ("boxes", "labels", "area", "iscrowd", "overlapping"):
        assert target[key].shape[0] == n, key
    assert target["labels"].dtype == torch.int64 and target["iscrowd"].dtype == torch.int64
    assert target["overlapping"].dtype == torch.bool and target["area"].dtype == torch.float32
    assert target["image_id"] == 7
    for box, mask in zip(boxes.tolist(), masks.numpy()):
        assert mask.any()
        assert np.abs(np.array(box) - tight_box(mask)).max() <= 1.0
    assert target["area"].tolist() == masks.flatten(1).sum(1).float().tolist()
    # the keys travel with their own instance: overlapping was set on even labels, sizes grow with the label
    assert target["overlapping"].tolist() == (target["labels"] % 2 == 0).tolist()
    by_size = target["labels"][masks.flatten(1).sum(1).argsort()]
    assert by_size.tolist() == sorted(target["labels"].tolist())


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("train", [True, False])
def test_every_preset_keeps_boxes_masks_and_keys_consistent(preset, train):
    transform = get_transform(preset, train)
    shapes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = transform(*make_sample())
        check_consistent(image, target)
        assert target["masks"].shape[0] == len(SIDES)  # every square stays inside the canvas
        # the image moved with the masks: the squares are brighter than the background
        inside = target["masks"].bool().any(0)
        assert image[:, inside].mean() > image[:, ~inside].mean() + 0.3
        shapes.add(tuple(image.shape[-2:]))
    if preset == "chromosome" and train:
        assert shapes == {(H, W), (W, H)}  # quarter turns happen
    else:
        assert shapes == {(H, W)}


def centre(mask: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return xs.float().mean().item(), ys.float().mean().item()


@pytest.mark.parametrize("preset", ["hflip", "flip"])
def test_flip_presets_flip(preset):
    transform = get_transform(preset, train=True)
    x0, y0 = centre(make_sample()[1]["masks"][3])  # right of and below the canvas centre
    assert x0 > W / 2 and y0 > H / 2
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        image, target = transform(*make_sample())
        check_consistent(image, target)
        x, y = centre(target["masks"][3])
        assert x in (pytest.approx(x0), pytest.approx(W - 1 - x0))
        assert y in (pytest.approx(y0), pytest.approx(H - 1 - y0))
        seen.add((x < W / 2, y < H / 2))
    assert {h for h, _ in seen} == {True, False}
    assert {v for _, v in seen} == ({True, False} if preset == "flip" else {False})


def test_eval_transform_only_fixes_dtypes():
    image, target = make_sample()
    uint8_image = tv_tensors.Image((image * 255).round().to(torch.uint8))
    out_image, out_target = get_transform("chromosome", train=False)(uint8_image, dict(target))
    assert out_image.dtype == torch.float32 and out_image.max() <= 1.0
    assert torch.allclose(out_image, image, atol=1 / 255)
    for key in ("boxes", "masks", "labels", "area", "iscrowd", "overlapping"):
        assert torch.equal(out_target[key], target[key])


def test_chromosome_preset_changes_grey_levels_and_geometry():
    transform = get_transform("chromosome", train=True)
    original, _ = make_sample()
    changed_levels = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, _ = transform(*make_sample())
        if image.shape == original.shape and not torch.allclose(image, original, atol=1e-3):
            changed_levels += 1
        assert 0.0 <= image.min() and image.max() <= 1.0
    assert changed_levels > 0


def test_invert_prob_inverts_grey_levels():
    image, target = make_sample()
    out, out_target = get_transform("none", train=True, invert_prob=1.0)(image, target)
    assert torch.allclose(out, 1.0 - image)
    assert torch.equal(out_target["masks"], target["masks"])
    torch.manual_seed(0)
    out, out_target = get_transform("chromosome", train=True, invert_prob=1.0)(*make_sample())
    inside = out_target["masks"].bool().any(0)
    assert out[:, inside].mean() < out[:, ~inside].mean() - 0.3  # dark chromosomes on a light background


def test_a_flag_whose_crossing_is_cut_away_is_cleared():
    image, target = make_sample()
    target["masks"][3] = 0  # a crop took square 4 away: square 2 crosses nothing any more
    _, out = tighten_instances(image, target)
    assert out["labels"].tolist() == [1, 2, 3] and out["overlapping"].tolist() == [False, False, False]
    image, target = make_sample()
    target["masks"][3, 46:52, 66:70] = 0  # the crossing itself cut away, both squares still there
    assert tighten_instances(image, target)[1]["overlapping"].tolist() == [False, False, False, False]
    image, target = make_sample()
    target["overlapping"][:] = True  # a flag is only ever cleared, never set: the rule's threshold is not known here
    assert tighten_instances(image, target)[1]["overlapping"].tolist() == [False, True, False, True]


def test_emptied_instances_are_dropped_with_their_keys():
    image, target = make_sample()
    target["masks"][0] = 0  # as if a crop had pushed it out
    target["boxes"][1] = torch.tensor([0.0, 0.0, 5.0, 5.0])  # stale box
    _, out = tighten_instances(image, target)
    assert out["labels"].tolist() == [2, 3, 4]
    assert out["overlapping"].tolist() == [True, False, True]
    assert out["iscrowd"].tolist() == [0, 0, 0] and out["masks"].shape[0] == 3
    check_consistent(image, out)


def test_presets_handle_images_without_instances():
    for preset in PRESETS:
        torch.manual_seed(1)
        image, target = get_transform(preset, train=True)(*make_sample(with_instances=False))
        assert target["boxes"].shape == (0, 4) and target["masks"].shape[0] == 0
        assert target["masks"].shape[-2:] == image.shape[-2:]


def test_bad_preset_and_invert_prob_are_named():
    with pytest.raises(ValueError, match=r"unknown augmentation preset 'rotate'; choose one of none, hflip"):
        get_transform("rotate", train=True)
    with pytest.raises(ValueError, match=r"invert_prob must be in 0\.\.1, got 1\.5"):
        get_transform("flip", train=True, invert_prob=1.5)


def test_chromosome_preset_on_the_dataset(tiny_coco):
    ds = ChromosomeDataset(tiny_coco, "train", transforms=get_transform("chromosome", train=True))
    for index in range(len(ds)):
        torch.manual_seed(index)
        image, target = ds[index]
        assert image.dtype == torch.float32 and target["masks"].shape[0] >= 1
        for box, mask in zip(target["boxes"].tolist(), target["masks"].numpy()):
            assert np.abs(np.array(box) - tight_box(mask)).max() <= 1.0
        assert target["labels"].shape == target["overlapping"].shape == target["area"].shape


def test_random_gamma_changes_the_image_only():
    image, target = make_sample()
    out, out_target = RandomGamma((2.0, 2.0))(image, target)
    assert torch.allclose(out, image ** 2) and torch.equal(out_target["masks"], target["masks"])
