"""bench/bench_infer.py's pieces that need no timing run: the stage profile of ``--profile``."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from network_files import ModelConfig, build_model

_SPEC = importlib.util.spec_from_file_location("bench_infer", Path(__file__).resolve().parents[1] / "bench" /
                                               "bench_infer.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_infer"] = bench
_SPEC.loader.exec_module(bench)


@pytest.mark.parametrize("name", ["maskrcnn", "dacseg"])
def test_stage_profile_splits_an_image_into_stages_that_add_up(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, backbone="resnet18", min_size=128, max_size=160,
                                    overlap_cls_head="conv")).eval()
    bench.keep_detections(model, 5)  # untrained scores: keep 5 detections whatever they score
    image = torch.rand(3, 128, 160)
    rows = {stage: (seconds, gflop) for stage, seconds, gflop in bench.stage_profile(model, [image])}
    expected = {"transform", "backbone", "rpn", "roi_heads.box_head", "roi_heads.mask_head", "roi_heads, the rest",
                "pasting and the rest", "total"}
    assert expected <= set(rows)
    assert ("roi_heads.overlap_head" in rows) == (name == "dacseg")
    hooked = [stage for stage in rows if "the rest" not in stage and stage != "total"]
    assert all(rows[stage][0] > 0 for stage in hooked)  # each hooked stage ran and was timed
    assert all(rows[stage][0] >= 0 for stage in ("roi_heads, the rest", "pasting and the rest"))
    assert sum(rows[stage][0] for stage in hooked) < rows["total"][0]  # the hooks time parts, not the whole
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        features = model.backbone(model.transform([image])[0].tensors)
    assert features and math.isclose(rows["backbone"][1], counter.get_total_flops() / 1e9, rel_tol=1e-6)
    assert rows["total"][1] > rows["backbone"][1] + rows["roi_heads.mask_head"][1] > rows["backbone"][1] > 0
    assert all(hook_free for hook_free in (not model.backbone._forward_hooks, not model.rpn._forward_pre_hooks))


def test_float32_rate_is_measured_for_matmul_and_convolution():
    rates = bench.float32_rate(seconds=0.2)
    assert set(rates) == {"matmul", "conv3x3"} and all(rate > 0.1 for rate in rates.values())
