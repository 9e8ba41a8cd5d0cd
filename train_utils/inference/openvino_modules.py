"""The heavy modules of a PyTorch model run by OpenVINO on the CPU, in exact float32, inside ``inference.detect``.

``predict.py --openvino`` (``Speedups(openvino=True)``) converts the convolution-heavy modules of a torchvision
``GeneralizedRCNN``, Mask R-CNN or DaCSeg, with ``openvino.convert_model`` and compiles them for the CPU with
``INFERENCE_PRECISION_HINT=f32`` (OpenVINO otherwise runs bfloat16 on CPUs with AMX or AVX-512 BF16), each for any
input size (``converted_paths``): the backbone (ResNet and FPN), the RPN's head (its 3x3 convolution over every FPN
level) and every stack of 3x3 RoI convolutions (the mask head; DaCSeg's two stages). These are most of an image's
work. Everything else stays PyTorch: the resize, anchors, proposal selection and NMS, RoIAlign, the box head, the
mask predictors, the overlap classifier and attention, and the box-sized pasting, so the outputs are ``detect``'s.

The conversion traces each module once (seconds to tens of seconds, printed) and is kept on the model, so a folder
pays it once. Without openvino, or where a conversion or compilation fails, the model stays PyTorch and one line
says why. ``use_openvino(model, False)`` puts the PyTorch modules back.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

from errors import one_line

_EXAMPLE_SIZE = 320  # the example image's side for tracing (any multiple of 32; the graphs take any size)


class _FlatLevels(nn.Module):
    """The RPN head with one input per FPN level and a flat output tuple (what ``openvino.convert_model`` traces)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, *levels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, deltas = self.head(list(levels))
        return (*logits, *deltas)


class OpenVinoModule(nn.Module):
    """A module's forward run by an OpenVINO graph compiled in float32 for any input shape. ``pack`` turns the graph's
    output tensors back into what the module returns; inputs with an empty dimension (no detections) run the PyTorch
    module, which OpenVINO's kernels need not handle."""

    def __init__(self, compiled: Any, original: nn.Module, pack: Callable[[list[torch.Tensor]], Any]) -> None:
        super().__init__()
        self.compiled, self.pack = compiled, pack
        self.__dict__["original"] = original  # not a submodule: the state dict stays the model's own

    def forward(self, *inputs: Any) -> Any:
        flat = [t for x in inputs for t in (x if isinstance(x, (list, tuple)) else [x])]
        if any(t.numel() == 0 for t in flat):
            return self.original(*inputs)
        arrays = [np.ascontiguousarray(t.detach().float().cpu().numpy()) for t in flat]
        results = self.compiled(arrays)  # copies its outputs (OpenVINO's default), so they outlive the next call
        return self.pack([torch.from_numpy(results[output]) for output in self.compiled.outputs])


def _compile(core: Any, module: nn.Module, example: tuple[torch.Tensor, ...], threads: int) -> Any:
    import openvino

    with torch.no_grad():
        graph = openvino.convert_model(module, example_input=example if len(example) > 1 else example[0])
    properties = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    return core.compile_model(graph, "CPU", properties)


def converted_paths(model: nn.Module) -> list[str]:
    """The modules ``use_openvino`` runs with OpenVINO: the backbone, the RPN head, and every stack of RoI
    convolutions (torchvision's ``MaskRCNNHeads``: the mask head, DaCSeg's stage convolutions, the shape prior's
    refinement head)."""
    stacks = [f"roi_heads.{name}" for name, module in model.roi_heads.named_modules()
              if isinstance(module, MaskRCNNHeads)]
    return ["backbone", "rpn.head", *stacks]


def _converted(model: nn.Module, threads: int) -> dict[str, OpenVinoModule]:
    """The ``OpenVinoModule`` stand-ins of ``converted_paths(model)``, traced on a random example image and RoIs."""
    import openvino

    core = openvino.Core()
    backbone, rpn_head = model.backbone, model.rpn.head
    image = torch.rand(1, 3, _EXAMPLE_SIZE, _EXAMPLE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = backbone(image)
    names, levels = list(features), tuple(features.values())
    count = len(levels)
    stand_ins = {
        "backbone": OpenVinoModule(_compile(core, backbone, (image,), threads), backbone,
                                   lambda out: OrderedDict(zip(names, out))),
        "rpn.head": OpenVinoModule(_compile(core, _FlatLevels(rpn_head), levels, threads), rpn_head,
                                   lambda out: (out[:count], out[count:])),
    }
    for path in converted_paths(model)[2:]:
        stack = model.get_submodule(path)
        channels = next(m.in_channels for m in stack.modules() if isinstance(m, nn.Conv2d))
        rois = torch.rand(2, channels, 14, 14, generator=torch.Generator().manual_seed(1))
        stand_ins[path] = OpenVinoModule(_compile(core, stack, (rois,), threads), stack, lambda out: out[0])
    return stand_ins


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def use_openvino(model: nn.Module, enabled: bool, threads: int | None = None, log: Callable[[str], None] = print
                 ) -> bool:
    """Run ``model``'s backbone, RPN head and mask head with OpenVINO (``enabled``), or put the PyTorch modules
    back; returns whether OpenVINO runs them now. The first call converts and compiles them (printed); a model
    whose modules cannot be converted here stays PyTorch, with one line saying why."""
    stand_ins = model.__dict__.get("_openvino_modules")
    if not enabled:
        for path, module in (stand_ins or {}).items():
            _set(model, path, module.original)
        return False
    if stand_ins is None:
        start = time.perf_counter()
        try:
            import openvino  # noqa: F401
        except ImportError:
            log("openvino is not installed (pip install openvino): running PyTorch")
            return False
        try:
            stand_ins = _converted(model, threads or torch.get_num_threads())
        except Exception as exc:  # OpenVINO's and the tracer's own error types: fall back, in one line
            log(f"OpenVINO could not convert the model ({type(exc).__name__}: {one_line(exc)[:300]}): running PyTorch")
            return False
        model.__dict__["_openvino_modules"] = stand_ins  # kept off the module tree and the state dict
        log(f"OpenVINO runs the backbone, the RPN head and {len(stand_ins) - 2} stack(s) of RoI convolutions in "
            f"float32 (converted in {time.perf_counter() - start:.1f} s)")
    for path, module in stand_ins.items():
        _set(model, path, module)
    return True
