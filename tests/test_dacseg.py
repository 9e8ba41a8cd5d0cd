"""DaCSeg heads: target derivation, losses, training and inference edge cases (where the published code crashed)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torchvision
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import masks_to_boxes

from network_files import ModelConfig, build_model
from network_files.config import DACSEG_LOSS_NAMES, LOSS_NAMES, SHAPE_PRIOR_LOSS_NAMES
from network_files.dacseg import (
    OVERLAP_MAP_KEYS,
    DaCSegRoIHeads,
    DaCSegTransform,
    NonLocalAttention,
    convert_to_dacseg,
    mask_boundaries,
    overlap_classifier_conv,
    overlap_classifier_fc,
    overlap_regions,
    overlap_targets,
)
from overlaps import overlapping_from_rles
from train_utils.outputs.predictions import outputs_to_coco_results

HEIGHT, WIDTH = 128, 160
# (y0, y1, x0, x1): a horizontal and a vertical bar crossing over 16 x 16 px, and a free bar on the right
CROSSING_BARS = [(56, 72, 20, 120), (16, 112, 62, 78), (20, 40, 130, 150)]
DACSEG_MODULES = ("overlap_classifier", "overlap_head", "mask_head", "mask_predictor")


def bar_masks(bars: list[tuple[int, int, int, int]], height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    masks = torch.zeros(len(bars), height, width, dtype=torch.uint8)
    for mask, (y0, y1, x0, x1) in zip(masks, bars):
        mask[y0:y1, x0:x1] = 1
    return masks


def rule_flags(masks: torch.Tensor, min_area: float = 20.0) -> torch.Tensor:
    """The overlap flags of ``[N, H, W]`` masks by the one rule (``overlaps``), as the dataset gives them."""
    rles = [mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8))) for m in masks]
    return torch.tensor(overlapping_from_rles(rles, min_area), dtype=torch.bool)


def bars_sample(bars: list[tuple[int, int, int, int]], height: int = HEIGHT, width: int = WIDTH):
    """A dark image with bright bars and its target (boxes, labels, masks, overlapping)."""
    masks = bar_masks(bars, height, width)
    image = torch.full((3, height, width), 0.1)
    image[:, masks.bool().any(dim=0)] = 0.8
    target = {"boxes": masks_to_boxes(masks), "labels": torch.ones(len(bars), dtype=torch.int64), "masks": masks,
              "overlapping": rule_flags(masks)}
    return image, target


def empty_target(height: int = HEIGHT, width: int = WIDTH) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, height, width, dtype=torch.uint8),
        "overlapping": torch.zeros(0, dtype=torch.bool),
    }


def tiny_config(**kwargs) -> ModelConfig:
    options = dict(name="dacseg", overlap_cls_head="conv", min_size=128, max_size=160)
    options.update(trainable_layers=0, norm_layer="bn")  # frozen body; batch statistics keep random features sane
    options.update(kwargs)
    return ModelConfig(**options)


def make_fast(model: torchvision.models.detection.MaskRCNN) -> torchvision.models.detection.MaskRCNN:
    """Few proposals and sampled RoIs, so a step takes about a second on a slow CPU."""
    model.rpn._pre_nms_top_n = dict(training=64, testing=64)
    model.rpn._post_nms_top_n = dict(training=32, testing=32)
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 16
    return model


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return build_model(tiny_config())


@pytest.fixture
def model(base_model):
    torch.manual_seed(0)
    return make_fast(copy.deepcopy(base_model))


def assert_finite_losses(losses: dict[str, torch.Tensor]) -> None:
    assert set(losses) == (set(LOSS_NAMES) - set(SHAPE_PRIOR_LOSS_NAMES))
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name


# ------------------------------------------------------------------------------------------------ targets


def test_overlap_regions_of_crossing_bars():
    masks = bar_masks(CROSSING_BARS)
    overlap, overlap_else = overlap_regions(masks, rule_flags(masks))
    crossing = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    crossing[56:72, 62:78] = True
    for i in (0, 1):
        assert torch.equal(overlap[i], crossing)
        assert torch.equal(overlap_else[i], masks[i].bool() & ~crossing)
    assert not overlap[2].any() and not overlap_else[2].any()  # the free bar


@pytest.mark.parametrize("min_area, touching", [(11, True), (12, False), (20, False)])
def test_overlap_regions_touching_bars_follow_the_rule(min_area, touching):
    masks = bar_masks([(10, 16, 5, 31), (15, 21, 20, 41)])  # they share row 15, columns 20..30: 11 px
    overlap, overlap_else = overlap_regions(masks, rule_flags(masks, min_area))
    assert overlap.any().item() is touching
    assert overlap_else.any().item() is touching
    if touching:
        assert overlap.sum().item() == 22


@pytest.mark.parametrize("seed", range(4))
def test_overlap_region_is_what_the_rule_measures(seed):
    """The heads' torch region (where an instance meets any other) has, per instance, the area that the rule of
    ``overlaps`` compares with the threshold, so the flag and the region cannot disagree."""
    generator = torch.Generator().manual_seed(seed)
    bars = []
    for _ in range(8):
        y0, x0 = (int(v) for v in torch.randint(0, 100, (2,), generator=generator))
        tall = bool(torch.randint(0, 2, (1,), generator=generator))
        bars.append((y0, y0 + (40 if tall else 6), x0, x0 + (6 if tall else 40)))
    masks = bar_masks(bars)
    everything = torch.ones(len(bars), dtype=torch.bool)
    overlap, _ = overlap_regions(masks, everything)
    areas = overlap.flatten(1).sum(dim=1)
    for min_area in (1, 20, 60):
        assert (areas >= min_area).tolist() == rule_flags(masks, min_area).tolist()
    flags = rule_flags(masks)
    overlap, overlap_else = overlap_regions(masks, flags)
    assert not overlap[~flags].any() and not overlap_else[~flags].any()
    assert torch.equal(overlap[flags] | overlap_else[flags], masks[flags].bool())


def test_overlap_regions_without_instances():
    overlap, overlap_else = overlap_regions(torch.zeros(0, HEIGHT, WIDTH, dtype=torch.uint8),
                                            torch.zeros(0, dtype=torch.bool))
    assert overlap.shape == overlap_else.shape == (0, HEIGHT, WIDTH)


def test_mask_boundaries_is_the_inner_ring():
    masks = torch.zeros(2, 28, 28)
    masks[0, 5:15, 5:15] = 1
    edges = mask_boundaries(masks)
    ring = torch.zeros(28, 28)
    ring[5:15, 5:15] = 1
    ring[6:14, 6:14] = 0
    assert torch.equal(edges[0], ring)
    assert not edges[1].any()
    full = mask_boundaries(torch.ones(1, 28, 28))  # the RoI border counts as boundary
    assert full.sum().item() == 4 * 28 - 4


def test_overlap_targets_labels_and_regions_on_gt_boxes():
    _, target = bars_sample(CROSSING_BARS)
    boxes = target["boxes"]
    targets = overlap_targets([boxes], [target["masks"]], [target["labels"]], [target["overlapping"]],
                              [torch.arange(3)], 28)
    assert targets.overlapping.tolist() == [1, 1, 0]
    assert targets.labels.tolist() == [1, 1, 1]
    assert targets.overlap.shape == targets.overlap_edge.shape == (3, 28, 28)
    # horizontal bar: 100 px long, crossing at columns 62..77 -> the middle ~16 % of its RoI, full height
    columns = (targets.overlap[0] > 0.5).any(dim=0).nonzero()[:, 0]
    assert 11 <= columns.min() <= 12 and 15 <= columns.max() <= 16
    assert (targets.overlap[0] > 0.5).all(dim=0)[columns].all()
    assert torch.allclose(targets.overlap[0] + targets.overlap_else[0], torch.ones(28, 28), atol=1e-5)
    assert targets.overlap[2].abs().sum() == 0 and targets.overlap_else[2].abs().sum() == 0
    assert targets.overlap_edge[0].any() and targets.overlap_else_edge[0].any()
    assert not targets.overlap_edge[2].any() and not targets.overlap_else_edge[2].any()


def test_overlap_targets_without_positives_or_instances():
    empty = empty_target()
    _, target = bars_sample(CROSSING_BARS)
    targets = overlap_targets(
        [torch.zeros(0, 4), torch.zeros(0, 4)],
        [empty["masks"], target["masks"]],
        [empty["labels"], target["labels"]],
        [empty["overlapping"], target["overlapping"]],
        [torch.zeros(0, dtype=torch.int64)] * 2,
        28,
    )
    assert targets.overlapping.shape == (0,) and targets.overlap.shape == (0, 28, 28)


def test_training_takes_the_datasets_flags_at_any_resize(monkeypatch):
    """The classifier targets are the instances' own flags, whatever the model's resize does to the areas."""
    bars = [(y0 * 2, y1 * 2, x0 * 2, x1 * 2) for y0, y1, x0, x1 in [(28, 32, 10, 60), (8, 56, 31, 35), (4, 8, 4, 40)]]
    image, target = bars_sample(bars, 2 * HEIGHT, 2 * WIDTH)  # 8 x 8 = 64 px crossing at the original size
    assert target["overlapping"].tolist() == [True, True, False]
    seen = []

    def spy(*args):
        seen.append(args[3][0].tolist())
        return overlap_targets(*args)

    monkeypatch.setattr("network_files.dacseg.overlap_targets", spy)
    torch.manual_seed(0)
    model = make_fast(build_model(tiny_config()))  # resizes to half: the crossing is 16 px there
    model.train()
    model([image], [target])
    assert seen == [[True, True, False]]
    target["overlapping"] = torch.tensor([False, False, False])  # an annotation's own flags win, as in the metrics
    seen.clear()
    model([image], [target])
    assert seen == [[False, False, False]]


def test_training_without_overlap_flags_names_them():
    image, target = bars_sample(CROSSING_BARS)
    del target["overlapping"]
    torch.manual_seed(0)
    model = make_fast(build_model(tiny_config()))
    model.train()
    with pytest.raises(ValueError, match="'overlapping': a bool per instance"):
        model([image], [target])


# ------------------------------------------------------------------------------------------------ heads


def test_classifier_parameter_counts():
    fc = overlap_classifier_fc(in_channels=8, resolution=14, hidden=16)  # the published one is checked below
    assert sum(p.numel() for p in fc.parameters()) == 8 * 14 * 14 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2
    assert fc(torch.zeros(3, 8, 14, 14)).shape == (3, 2)
    conv = overlap_classifier_conv()
    assert 100_000 < sum(p.numel() for p in conv.parameters()) < 1_000_000
    assert conv(torch.zeros(3, 256, 14, 14)).shape == (3, 2)


def test_non_local_attention_is_global_and_permutation_equivariant():
    torch.manual_seed(0)
    block = NonLocalAttention(8).eval()
    with torch.no_grad():
        block.norm.running_mean.uniform_(-1, 1)
        x = torch.randn(2, 8, 5, 5)
        out = block(x)
        far = x.clone()
        far[:, :, 0, 0] += 3
        assert not torch.allclose(block(far)[:, :, 4, 4], out[:, :, 4, 4])  # a 1x1 conv would not see it
        order = torch.randperm(25)
        permuted = block(x.flatten(2)[:, :, order].reshape(2, 8, 5, 5))
        assert torch.allclose(permuted.flatten(2), out.flatten(2)[:, :, order], atol=1e-5)
        assert block(torch.zeros(0, 8, 5, 5)).shape == (0, 8, 5, 5)


def test_heads_are_chained(base_model):
    """Stage 2 reads F + X1, the fused mask reads F + X2, the classifier reads only F."""
    torch.manual_seed(0)
    roi_heads = copy.deepcopy(base_model.roi_heads).eval()
    features = {name: torch.randn(1, 256, 32 // 2**i, 40 // 2**i) for i, name in enumerate(["0", "1", "2", "3"])}
    boxes = [torch.tensor([[10.0, 10, 90, 60], [50, 20, 120, 100]])]

    def logits():
        with torch.no_grad():
            return roi_heads.dacseg_logits(features, boxes, [(128, 160)])

    reference = logits()
    with torch.no_grad():
        roi_heads.overlap_head.overlap_else.convs[-1][0].weight.mul_(1.5)
    changed = logits()
    assert torch.equal(changed.overlap, reference.overlap) and torch.equal(changed.overlap_cls, reference.overlap_cls)
    assert not torch.allclose(changed.overlap_else, reference.overlap_else)
    assert not torch.allclose(changed.mask, reference.mask)
    with torch.no_grad():
        roi_heads.overlap_head.overlap.convs[-1][0].weight.mul_(1.5)
    changed_again = logits()
    assert not torch.allclose(changed_again.overlap, changed.overlap)
    assert not torch.allclose(changed_again.overlap_else_edge, changed.overlap_else_edge)
    assert torch.equal(changed_again.overlap_cls, reference.overlap_cls)


def test_convert_torchvision_mask_rcnn_with_fc_classifier(base_model):
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, min_size=128, max_size=160
    )
    maskrcnn_state = model.state_dict()
    box_predictor = model.roi_heads.box_predictor
    assert convert_to_dacseg(model, tiny_config(overlap_cls_head="fc")) is model
    assert isinstance(model.roi_heads, DaCSegRoIHeads) and isinstance(model.transform, DaCSegTransform)
    assert model.roi_heads.box_predictor is box_predictor  # reused, not rebuilt
    fc_parameters = 256 * 14 * 14 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 2 + 2
    assert sum(p.numel() for p in model.roi_heads.overlap_classifier.parameters()) == fc_parameters == 52_432_898
    # Mask R-CNN weights load into DaCSeg: everything shared loads, only the new heads are missing
    result = model.load_state_dict(maskrcnn_state, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(
        k.startswith(("roi_heads.overlap_classifier.", "roi_heads.overlap_head.")) for k in result.missing_keys
    )
    # the built conv model has the same structure apart from the classifier
    def shared(keys):
        return {k for k in keys if not k.startswith("roi_heads.overlap_classifier.")}

    assert shared(base_model.state_dict()) == shared(model.state_dict())
    with pytest.raises(ValueError, match="already"):
        convert_to_dacseg(model, tiny_config())


def test_convert_rejects_other_class_count():
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=160
    )
    with pytest.raises(ValueError, match="num_classes"):
        convert_to_dacseg(model, tiny_config())


# ------------------------------------------------------------------------------------------------ training


def test_training_losses_and_gradients_reach_every_head(model):
    model.train()
    image, target = bars_sample(CROSSING_BARS)
    second, second_target = bars_sample([(60, 70, 30, 130), (20, 100, 40, 50)])
    losses = model([image, second], [target, second_target])
    assert_finite_losses(losses)
    sum(losses.values()).backward()
    for module_name in DACSEG_MODULES + ("box_head", "box_predictor"):
        module = getattr(model.roi_heads, module_name)
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None, f"{module_name}.{name}"
            assert torch.isfinite(parameter.grad).all(), f"{module_name}.{name}"
        assert any(p.grad.abs().sum() > 0 for p in module.parameters()), module_name
    for stage in (model.roi_heads.overlap_head.overlap, model.roi_heads.overlap_head.overlap_else):
        for part in (stage.conv_in, stage.attention, stage.convs, stage.mask_predictor, stage.edge_predictor):
            assert any(p.grad.abs().sum() > 0 for p in part.parameters())


def test_training_images_without_ground_truth(model):
    """An image without chromosomes beside one with: the other's masks still teach every mask and DaCSeg term. A
    batch without any: those terms are 0 and give the mask predictor no gradient, while the background is still
    learned (classifier and objectness)."""
    model.train()
    image, target = bars_sample(CROSSING_BARS)
    mixed = model([image, image], [target, empty_target()])
    assert_finite_losses(mixed)
    for name in ("loss_mask",) + DACSEG_LOSS_NAMES:
        assert mixed[name].item() > 0, name
    losses = model([image, image], [empty_target(), empty_target()])
    assert_finite_losses(losses)
    for name in ("loss_mask", "loss_box_reg", "loss_rpn_box_reg") + DACSEG_LOSS_NAMES:
        assert losses[name].item() == 0.0, name
    assert losses["loss_classifier"].item() > 0 and losses["loss_objectness"].item() > 0
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.roi_heads.mask_predictor.parameters())


def test_exactly_one_positive_roi_in_batch(model, monkeypatch):
    model.train()
    image, target = bars_sample([(56, 72, 20, 120)])
    images, targets = model.transform([image, image], [target, empty_target()])
    features = model.backbone(images.tensors)
    far_away = torch.tensor([[130.0, 2.0, 158.0, 20.0], [2.0, 100.0, 30.0, 126.0]])  # IoU 0 with the bar
    rois_seen = []
    dacseg_logits = DaCSegRoIHeads.dacseg_logits

    def spy(self, features, boxes, image_shapes, with_maps=True, labels=None):
        rois_seen.append([len(b) for b in boxes])
        return dacseg_logits(self, features, boxes, image_shapes, with_maps, labels)

    monkeypatch.setattr(DaCSegRoIHeads, "dacseg_logits", spy)
    _, losses = model.roi_heads(features, [far_away, far_away.clone()], images.image_sizes, targets)
    assert rois_seen == [[1, 0]]  # the ground-truth box of image 0, added as a proposal
    assert set(losses) == (set(LOSS_NAMES) - set(SHAPE_PRIOR_LOSS_NAMES)) - {"loss_objectness", "loss_rpn_box_reg"}
    for name, value in losses.items():
        assert torch.isfinite(value), name
    assert losses["loss_overlap"].item() > 0
    sum(losses.values()).backward()
    assert model.roi_heads.overlap_classifier[-1].weight.grad is not None


def test_loss_weights_weigh_the_dacseg_terms_in_the_training_step(base_model):
    from train_utils.engine.loop import weighted_loss

    torch.manual_seed(0)
    model = make_fast(build_model(tiny_config(loss_weights={"loss_overlap": 0.0, "loss_objectness": 2.0})))
    model.load_state_dict(base_model.state_dict())
    model.train()
    image, target = bars_sample(CROSSING_BARS)
    torch.manual_seed(1)
    terms = model([image], [target])
    assert terms["loss_overlap"].item() > 0  # the model returns every term unweighted
    total = weighted_loss(terms, {"loss_overlap": 0.0, "loss_objectness": 2.0})
    expected = sum(v for k, v in terms.items() if k != "loss_overlap") + terms["loss_objectness"]
    assert total.item() == pytest.approx(expected.item())


def test_a_few_steps_reduce_every_dacseg_loss(model):
    """15 Adam steps of the RoI heads on fixed backbone features of one image lower the mask and DaCSeg losses."""
    model.train()
    image, target = bars_sample(CROSSING_BARS)
    with torch.no_grad():
        images, targets = model.transform([image], [target])
        features = model.backbone(images.tensors)
    negatives = [torch.tensor([[0.0, 90.0, 30.0, 127.0], [100.0, 90.0, 159.0, 127.0]])]
    roi_heads = model.roi_heads

    def losses() -> dict[str, torch.Tensor]:
        return roi_heads(features, [p.clone() for p in negatives], images.image_sizes, targets)[1]

    def evaluate() -> dict[str, float]:
        torch.manual_seed(123)
        with torch.no_grad():
            return {k: v.item() for k, v in losses().items()}

    optimizer = torch.optim.Adam([p for p in roi_heads.parameters() if p.requires_grad], lr=3e-4)
    before = evaluate()
    for _ in range(15):
        optimizer.zero_grad()
        sum(losses().values()).backward()
        optimizer.step()
    after = evaluate()
    for name in ("loss_mask",) + DACSEG_LOSS_NAMES:
        assert after[name] < 0.9 * before[name], (name, before[name], after[name])


def test_training_under_bfloat16_autocast(model):
    model.train()
    image, target = bars_sample(CROSSING_BARS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([image, image], [target, empty_target()])
    assert_finite_losses(losses)
    sum(losses.values()).backward()
    for module_name in DACSEG_MODULES + ("box_predictor",):  # float32 weights get finite float32 gradients
        grads = [p.grad for p in getattr(model.roi_heads, module_name).parameters() if p.requires_grad]
        assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads), module_name


# ------------------------------------------------------------------------------------------------ inference


def fixed_detections(boxes_per_image: list[torch.Tensor]):
    """A stand-in for ``postprocess_detections`` returning the given boxes (resized-image coordinates)."""

    def postprocess_detections(class_logits, box_regression, proposals, image_shapes):
        scores = [torch.linspace(0.9, 0.6, len(b)) for b in boxes_per_image]
        labels = [torch.ones(len(b), dtype=torch.int64) for b in boxes_per_image]
        return [b.clone() for b in boxes_per_image], scores, labels

    return postprocess_detections


def force_overlapping(model, overlapping: bool) -> None:
    last = model.roi_heads.overlap_classifier[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 8.0] if overlapping else [8.0, 0.0]))


@pytest.mark.parametrize("overlapping", [True, False])
def test_exactly_one_detection(model, overlapping):
    """One detection per image through the real box branch (score threshold 0, one detection kept)."""
    model.eval()
    model.roi_heads.score_thresh = 0.0
    model.roi_heads.detections_per_img = 1
    force_overlapping(model, overlapping)
    image, _ = bars_sample(CROSSING_BARS, 2 * HEIGHT, 2 * WIDTH)  # resized to half by the model, pasted back
    with torch.no_grad():
        (output,) = model([image])
    assert set(output) == {"boxes", "labels", "scores", "masks", "overlap_scores"}  # no maps unless asked
    assert output["masks"].shape == (1, 1, 2 * HEIGHT, 2 * WIDTH)
    assert output["overlap_scores"].shape == (1,)
    assert (output["overlap_scores"].item() > 0.99) is overlapping
    (result,) = outputs_to_coco_results([output], [7], {1: 1})
    assert result["overlap_score"] == pytest.approx(output["overlap_scores"].item(), abs=1e-5)

    model.roi_heads.return_overlap_maps = True
    with torch.no_grad():
        (with_maps,) = model([image])
    assert torch.equal(with_maps["masks"], output["masks"])
    for key in OVERLAP_MAP_KEYS:
        assert with_maps[key].shape == (1, 1, 2 * HEIGHT, 2 * WIDTH), key
        assert 0 <= with_maps[key].min() and with_maps[key].max() <= 1


def test_batch_with_different_detection_counts_in_one_pass(model, monkeypatch):
    model.eval()
    model.roi_heads.return_overlap_maps = True
    image, _ = bars_sample(CROSSING_BARS)
    second, _ = bars_sample([(60, 70, 30, 130)])
    boxes = [
        torch.tensor([[20.0, 56, 120, 72], [62, 16, 78, 112], [130, 20, 150, 40]]),
        torch.tensor([[30.0, 60, 130, 70]]),
    ]
    calls = []
    dacseg_logits = DaCSegRoIHeads.dacseg_logits

    def spy(self, features, rois, image_shapes, with_maps=True, labels=None):
        calls.append(([len(b) for b in rois], with_maps))
        return dacseg_logits(self, features, rois, image_shapes, with_maps, labels)

    monkeypatch.setattr(DaCSegRoIHeads, "dacseg_logits", spy)
    monkeypatch.setattr(model.roi_heads, "postprocess_detections", fixed_detections(boxes))
    with torch.no_grad():
        outputs = model([image, second])
    assert calls == [([3, 1], True)]  # all heads ran once, maps included
    for output, count in zip(outputs, (3, 1)):
        assert output["boxes"].shape == (count, 4)
        assert output["masks"].shape == (count, 1, HEIGHT, WIDTH)
        assert output["overlap_scores"].shape == (count,)
        for key in OVERLAP_MAP_KEYS:
            assert output[key].shape == (count, 1, HEIGHT, WIDTH)

    # each image on its own gives the same per-detection results
    monkeypatch.setattr(model.roi_heads, "postprocess_detections", fixed_detections(boxes[1:]))
    with torch.no_grad():
        (alone,) = model([second])
    assert torch.allclose(alone["overlap_scores"], outputs[1]["overlap_scores"], atol=1e-5)
    assert torch.allclose(alone["overlap_else_mask"], outputs[1]["overlap_else_mask"], atol=1e-4)


def test_maps_are_computed_only_when_asked_and_change_nothing_else(model, monkeypatch):
    model.eval()
    image, _ = bars_sample(CROSSING_BARS)
    boxes = [torch.tensor([[20.0, 56, 120, 72], [62, 16, 78, 112], [130, 20, 150, 40]])]
    monkeypatch.setattr(model.roi_heads, "postprocess_detections", fixed_detections(boxes))
    called = []
    for stage in (model.roi_heads.overlap_head.overlap, model.roi_heads.overlap_head.overlap_else):
        for predictor in (stage.mask_predictor, stage.edge_predictor):
            predictor.register_forward_hook(lambda *_: called.append(1))
    outputs = {}
    for asked in (True, False):
        model.roi_heads.return_overlap_maps = asked
        called.clear()
        with torch.no_grad():
            (outputs[asked],) = model([image])
        assert len(called) == (4 if asked else 0)
    assert set(OVERLAP_MAP_KEYS) <= set(outputs[True]) and not set(OVERLAP_MAP_KEYS) & set(outputs[False])
    for key in ("masks", "overlap_scores", "scores"):
        assert torch.equal(outputs[True][key], outputs[False][key]), key


def test_no_detections(model, monkeypatch):
    model.eval()
    model.roi_heads.return_overlap_maps = True
    image, _ = bars_sample(CROSSING_BARS)
    monkeypatch.setattr(model.roi_heads, "postprocess_detections", fixed_detections([torch.zeros(0, 4)] * 2))
    with torch.no_grad():
        outputs = model([image, image])
    for output in outputs:
        assert output["boxes"].shape == (0, 4) and output["overlap_scores"].shape == (0,)
        assert output["masks"].shape == (0, 1, HEIGHT, WIDTH)
        for key in OVERLAP_MAP_KEYS:
            assert output[key].shape == (0, 1, HEIGHT, WIDTH)
    assert outputs_to_coco_results(outputs, [1, 2], {1: 1}) == []


def test_inference_under_bfloat16_autocast(model, monkeypatch):
    model.eval()
    model.roi_heads.return_overlap_maps = True
    image, _ = bars_sample(CROSSING_BARS)
    boxes = [torch.tensor([[20.0, 56, 120, 72], [62, 16, 78, 112]])]
    monkeypatch.setattr(model.roi_heads, "postprocess_detections", fixed_detections(boxes))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (output,) = model([image])
    assert output["overlap_scores"].dtype == torch.float32 and torch.isfinite(output["overlap_scores"]).all()
    assert output["overlap_mask"].shape == (2, 1, HEIGHT, WIDTH)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_float16_autocast(model):
    model.cuda()
    image, target = bars_sample(CROSSING_BARS)
    image, target = image.cuda(), {k: v.cuda() for k, v in target.items()}
    empty = {k: v.cuda() for k, v in empty_target().items()}
    model.train()
    with torch.autocast("cuda", dtype=torch.float16):
        losses = model([image, image], [target, empty])
    assert_finite_losses(losses)
    sum(losses.values()).backward()
    model.eval()
    model.roi_heads.return_overlap_maps = True
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        outputs = model([image, image])
    for output in outputs:
        count = len(output["boxes"])
        assert output["overlap_scores"].shape == (count,) and not math.isnan(output["overlap_scores"].sum().item())
        assert output["overlap_edge"].shape == (count, 1, HEIGHT, WIDTH)


def test_roi_heads_subclass_keeps_torchvision_settings(base_model):
    roi_heads = base_model.roi_heads
    assert isinstance(roi_heads, RoIHeads) and roi_heads.return_overlap_maps is False
    assert roi_heads.proposal_matcher.high_threshold == 0.5 and roi_heads.fg_bg_sampler.positive_fraction == 0.25


# ------------------------------------------------------------------------------------------------ design options


def _fusion_logits(base_model, fusion: str, tweak: str):
    """The fused mask before and after scaling the last conv of stage ``tweak`` ("overlap" or "overlap_else")."""
    torch.manual_seed(0)
    roi_heads = copy.deepcopy(base_model.roi_heads).eval()
    roi_heads.fusion = fusion
    features = {name: torch.randn(1, 256, 32 // 2**i, 40 // 2**i) for i, name in enumerate(["0", "1", "2", "3"])}
    boxes = [torch.tensor([[10.0, 10, 90, 60], [50, 20, 120, 100]])]
    with torch.no_grad():
        before = roi_heads.dacseg_logits(features, boxes, [(128, 160)])
        getattr(roi_heads.overlap_head, tweak).convs[-1][0].weight.mul_(1.5)
        after = roi_heads.dacseg_logits(features, boxes, [(128, 160)])
    return before, after


@pytest.mark.parametrize("fusion, reads_stage1, reads_stage2", [
    ("stage2", True, True), ("stage1", True, False), ("gated", True, True), ("none", False, False)])
def test_fusion_decides_which_stage_the_final_mask_reads(base_model, fusion, reads_stage1, reads_stage2):
    before, after = _fusion_logits(base_model, fusion, "overlap_else")
    assert (not torch.equal(before.mask, after.mask)) == reads_stage2
    before, after = _fusion_logits(base_model, fusion, "overlap")
    assert (not torch.equal(before.mask, after.mask)) == reads_stage1


def test_gated_fusion_scales_stage2_by_the_classifier(base_model):
    torch.manual_seed(0)
    roi_heads = copy.deepcopy(base_model.roi_heads).eval()
    roi_heads.fusion = "gated"
    features = {name: torch.randn(1, 256, 32 // 2**i, 40 // 2**i) for i, name in enumerate(["0", "1", "2", "3"])}
    boxes = [torch.tensor([[10.0, 10, 90, 60]])]
    with torch.no_grad():
        roi_heads.overlap_classifier[-1].weight.zero_()
        roi_heads.overlap_classifier[-1].bias.copy_(torch.tensor([50.0, -50.0]))  # surely not overlapping
        gated = roi_heads.dacseg_logits(features, boxes, [(128, 160)])
        roi_heads.fusion = "none"
        plain = roi_heads.dacseg_logits(features, boxes, [(128, 160)])
    torch.testing.assert_close(gated.mask, plain.mask)


def _mask_loss(base_model, image, target, **config) -> torch.Tensor:
    """The training ``loss_mask`` of a tiny DaCSeg with ``config``, the weights of ``base_model`` and one seed."""
    torch.manual_seed(0)
    model = make_fast(build_model(tiny_config(**config)))
    model.load_state_dict(base_model.state_dict())
    model.train()
    torch.manual_seed(1)
    return model([image], [target])["loss_mask"]


def test_mask_weights_one_are_mask_rcnn_loss_and_more_weigh_the_crossing_and_the_neighbours(base_model):
    image, target = bars_sample(CROSSING_BARS)
    losses = {weight: _mask_loss(base_model, image, target, crossing_mask_weight=weight) for weight in (1.0, 5.0)}
    assert losses[5.0] > losses[1.0]  # the crossing pixels weigh more (random heads miss them like any other)
    image, target = bars_sample([(40, 56, 20, 120), (70, 86, 50, 110)])
    target["masks"][0, 40:100, 20:36] = 1  # the first bar bent into an L whose box holds the second bar
    target["boxes"] = masks_to_boxes(target["masks"])
    image[:, target["masks"].bool().any(dim=0)] = 0.8
    for neighbour in (1.0, 5.0):
        losses["L", neighbour] = _mask_loss(base_model, image, target, neighbour_mask_weight=neighbour)
    assert losses["L", 5.0] > losses["L", 1.0]  # the other bar's pixels in the L's RoIs
    from network_files.dacseg import overlap_targets, weighted_mask_loss  # noqa: PLC0415
    from torchvision.models.detection.roi_heads import maskrcnn_loss  # noqa: PLC0415

    logits = torch.randn(2, 2, 28, 28)
    boxes = [target["boxes"][:2].float()]
    idxs = [torch.tensor([0, 1])]
    targets = overlap_targets(boxes, [target["masks"]], [target["labels"]], [target["overlapping"]], idxs, 28)
    torch.testing.assert_close(weighted_mask_loss(logits, boxes, [target["masks"]], idxs, targets, 1.0, 1.0),
                               maskrcnn_loss(logits, boxes, [target["masks"]], [target["labels"]], idxs))


def test_neighbour_regions_are_the_other_chromosomes_outside_each_own_mask():
    from network_files.dacseg import neighbour_regions  # noqa: PLC0415

    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2, :] = True  # a horizontal bar
    masks[1, :, 3] = True  # a vertical bar crossing it at (2, 3)
    masks[2, 6, 6] = True  # a lone dot
    got = neighbour_regions(masks)
    assert torch.equal(got[0], (masks[1] | masks[2]) & ~masks[0])  # the crossing pixel is its own, not a neighbour's
    assert not got[0, 2, 3] and got[0, 0, 3] and got[0, 6, 6]
    assert torch.equal(got[2], (masks[0] | masks[1]) & ~masks[2])
    assert neighbour_regions(torch.zeros(0, 8, 8, dtype=torch.bool)).shape == (0, 8, 8)


def test_neighbour_mask_weight_weighs_the_partner_pixels_a_mask_spills_into():
    from torchvision.models.detection.roi_heads import project_masks_on_boxes  # noqa: PLC0415

    from network_files.dacseg import neighbour_regions, overlap_targets, weighted_mask_loss  # noqa: PLC0415

    _, target = bars_sample(CROSSING_BARS[:2])  # a horizontal bar crossed by a vertical one
    masks = target["masks"]
    boxes = [torch.tensor([[20.0, 16, 120, 112]])]  # a RoI of the horizontal bar that holds the vertical one
    idxs = [torch.tensor([0])]
    targets = overlap_targets(boxes, [masks], [target["labels"]], [target["overlapping"]], idxs, 28)
    own = project_masks_on_boxes(masks, boxes[0], idxs[0], 28)[0] > 0.5
    partner = project_masks_on_boxes(neighbour_regions(masks), boxes[0], idxs[0], 28)[0] > 0.5
    background = torch.zeros_like(own).flatten()
    background[torch.where(~(own | partner).flatten())[0][:int(partner.sum())]] = True  # as many pixels
    background = background.view(28, 28)
    assert partner.sum() > 50 and background.sum() == partner.sum()

    def loss(spill: torch.Tensor, weight: float) -> float:
        logits = torch.where(own | spill, 8.0, -8.0).expand(1, 2, 28, 28)
        return float(weighted_mask_loss(logits, boxes, [masks], idxs, targets, 1.0, weight))

    assert loss(partner, 1.0) == pytest.approx(loss(background, 1.0), rel=0.05)  # plain: a pixel is a pixel
    assert loss(partner, 4.0) > 3 * loss(background, 4.0)  # weighted: spilling into the partner costs 4 times


def test_design_options_are_checked_and_recorded():
    with pytest.raises(ValueError, match="unknown DaCSeg fusion 'x3'"):
        ModelConfig(name="dacseg", fusion="x3")
    with pytest.raises(ValueError, match="crossing_mask_weight"):
        ModelConfig(name="dacseg", crossing_mask_weight=-1.0)
    with pytest.raises(ValueError, match="neighbour_mask_weight"):
        ModelConfig(name="dacseg", neighbour_mask_weight=float("inf"))
    config = tiny_config(fusion="gated", crossing_mask_weight=3.0, neighbour_mask_weight=2.0)
    assert ModelConfig.from_dict(config.to_dict()) == config
    heads = build_model(config).roi_heads
    assert (heads.fusion, heads.crossing_mask_weight, heads.neighbour_mask_weight) == ("gated", 3.0, 2.0)
