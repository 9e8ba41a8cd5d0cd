"""inference.detect: the one inference path, masks pasted at their box size, and model preparation."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from errors import UserError
from network_files.config import ModelConfig
from train_utils.inference.detect import detect, paste_detections, prepare_model
from train_utils.masks import BoxMasks

H, W = 48, 64


def first(output: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    return {k: v[:count] for k, v in output.items()}


def roi_output(overlap: bool = False) -> dict[str, torch.Tensor]:
    """Five detections as the RoI heads return them: boxes at image size, ``[N, 1, 28, 28]`` mask probabilities."""
    torch.manual_seed(0)
    out = {
        "boxes": torch.tensor([[5.0, 20, 39, 25], [18, 5, 23, 44], [50, 10, 55, 39], [0, 0, 63, 47], [30, 30, 31, 31]]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
        "labels": torch.ones(5, dtype=torch.int64),
        "masks": torch.rand(5, 1, 28, 28),
    }
    if overlap:
        for key in ("overlap_mask", "overlap_edge", "overlap_else_mask", "overlap_else_edge"):
            out[key] = torch.rand(5, 1, 28, 28)
    return out


@pytest.mark.parametrize("mask_thresh", [0.5, None])
def test_masks_stay_at_box_size_and_paste_to_torchvisions_masks(mask_thresh):
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    rois = roi_output(overlap=True)
    out = paste_detections(rois, (H, W), mask_thresh=mask_thresh)
    full = paste_masks_in_image(rois["masks"], rois["boxes"], (H, W))
    assert isinstance(out["masks"], BoxMasks) and out["masks"].size == (H, W)
    assert all(patch.shape == (y1 - y0, x1 - x0)
               for patch, (x0, y0, x1, y1) in zip(out["masks"].patches, out["masks"].regions.tolist()))
    assert sum(patch.numel() for patch in out["masks"].patches) < 2 * H * W  # one box is the whole image
    assert torch.equal(out["masks"].full(), full > 0.5 if mask_thresh is not None else full)
    edge = paste_masks_in_image(rois["overlap_edge"], rois["boxes"], (H, W))[:, 0].amax(dim=0)
    assert out["overlap_edge"].shape == (H, W) and torch.equal(out["overlap_edge"], edge)
    none = paste_detections(first(rois, 0), (H, W))
    assert len(none["masks"]) == 0 and not none["overlap_mask"].any()


@pytest.mark.parametrize("name", ["maskrcnn", "dacseg"])
def test_detect_matches_the_models_own_forward(name):
    from network_files import build_model

    torch.manual_seed(0)
    config = ModelConfig(name=name, min_size=128, max_size=160, trainable_layers=0, norm_layer="frozen_bn",
                         box_detections_per_img=5, overlap_cls_head="conv")
    model = build_model(config).eval()
    prepare_model(model, config, score_thresh=0.0)
    images = [torch.rand(3, 90, 120), torch.rand(3, 100, 80)]
    with torch.no_grad():
        expected = model(images)
    outputs = detect(model, images, mask_thresh=0.5)
    for output, want in zip(outputs, expected):
        assert len(output["scores"]) == 5
        assert torch.allclose(output["boxes"], want["boxes"]) and torch.equal(output["labels"], want["labels"])
        assert torch.equal(output["masks"].full(), want["masks"] > 0.5)
        if name == "dacseg":
            assert torch.allclose(output["overlap_scores"], want["overlap_scores"])


def test_detect_calls_other_models_as_they_are_and_thresholds_their_masks():
    masks = torch.tensor([[[[0.2, 0.7], [0.5, 0.9]]]])
    stand_in = lambda images: [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "masks": masks.clone()}]  # noqa: E731
    output = detect(stand_in, [torch.zeros(3, 2, 2)], mask_thresh=0.5)[0]
    assert output["masks"].full().tolist() == [[[[False, True], [False, True]]]]


def test_prepare_model_sets_the_score_threshold_and_asks_for_maps():
    model = SimpleNamespace(roi_heads=SimpleNamespace(score_thresh=0.05, return_overlap_maps=False))
    prepare_model(model, ModelConfig(name="dacseg"), score_thresh=0.01, overlap_maps=True)
    assert model.roi_heads.score_thresh == 0.01 and model.roi_heads.return_overlap_maps
    prepare_model(model, ModelConfig(name="dacseg"), score_thresh=0.5)
    # raised too: detections below the threshold are dropped before their masks are pasted at full size
    assert model.roi_heads.score_thresh == 0.5 and not model.roi_heads.return_overlap_maps
    with pytest.raises(UserError, match="DaCSeg"):
        prepare_model(model, ModelConfig(name="maskrcnn"), score_thresh=0.5, overlap_maps=True)


def tiny_model():
    from network_files import build_model

    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", min_size=128, max_size=160, trainable_layers=0, norm_layer="frozen_bn",
                         box_detections_per_img=5)
    model = build_model(config).eval()
    prepare_model(model, config, score_thresh=0.0)
    return model


def test_bf16_runs_the_backbone_only_and_channels_last_changes_nothing():
    from train_utils.inference.detect import Speedups, apply_speedups

    model, image = tiny_model(), torch.rand(3, 96, 128)
    reference = detect(model, [image])[0]
    dtypes = []
    model.backbone.body.conv1.register_forward_hook(lambda m, a, out: dtypes.append(("body", out.dtype)))
    model.roi_heads.box_head.register_forward_hook(lambda m, a, out: dtypes.append(("box head", out.dtype)))
    fast = detect(apply_speedups(model, Speedups(bf16=True, channels_last=True)), [image])[0]
    assert dtypes == [("body", torch.bfloat16), ("box head", torch.float32)]
    assert all(p.dtype == torch.bool for p in fast["masks"].patches) and fast["scores"].dtype == torch.float32
    apply_speedups(model, Speedups(channels_last=True))
    assert model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc = detect(model, [image])[0]
    assert torch.allclose(nhwc["boxes"], reference["boxes"], atol=1e-3) and torch.equal(nhwc["labels"], reference["labels"])
    assert (nhwc["masks"].full() != reference["masks"].full()).sum() <= 2 * len(reference["masks"])  # a pixel or so
    apply_speedups(model, Speedups())
    assert model.backbone.body.conv1.weight.is_contiguous()


def test_no_upscale_runs_an_image_inside_the_size_range_at_its_own_size():
    from train_utils.inference.detect import Speedups, apply_speedups

    model = tiny_model()
    sizes = []
    model.rpn.register_forward_pre_hook(lambda m, args: sizes.append(list(args[0].image_sizes)))
    small, large = torch.rand(3, 100, 120), torch.rand(3, 300, 400)
    detect(model, [small])
    detect(apply_speedups(model, Speedups(no_upscale=True)), [small, large])
    assert sizes == [[(128, 153)], [(100, 120)], [(120, 160)]]  # enlarged; its own; brought down to max-size 160
    assert model.transform.min_size == (128,)  # restored


def test_default_speedups_use_channels_last_on_the_cpu_for_mask_rcnn_only():
    from train_utils.inference.detect import Speedups, default_speedups

    assert default_speedups(ModelConfig(name="maskrcnn"), on_cpu=True) == Speedups(channels_last=True)
    assert default_speedups(ModelConfig(name="dacseg"), on_cpu=True) == Speedups()
    assert default_speedups(ModelConfig(name="maskrcnn"), on_cpu=False) == Speedups()
