"""The heavy modules of a PyTorch model run by OpenVINO on the CPU in float32, inside ``inference.detect``.

``predict.py --openvino`` (``Speedups(openvino=True)``) converts the convolution-heavy modules of a torchvision
``GeneralizedRCNN``, Mask R-CNN or DaCSeg, with ``openvino.convert_model`` and compiles them for the CPU with
``INFERENCE_PRECISION_HINT=f32`` (OpenVINO otherwise runs bfloat16 on CPUs with AMX or AVX-512 BF16), each for any
input size (``converted_paths``): the backbone (ResNet and FPN), the RPN's head (its 3x3 convolution over every FPN
level) and every stack of 3x3 RoI convolutions (the mask head; DaCSeg's two stages). These are most of an image's
work. Everything else stays PyTorch: the resize, anchors, proposal selection and NMS, RoIAlign, the box head, the
mask predictors, the overlap classifier and attention, and the box-sized pasting. The results are float32, not
bit-identical to PyTorch's (other kernels sum in another order; about 1e-5 relative).

The model itself is never changed: ``detect`` swaps the converted graphs in as the modules' forwards for the call
(``openvino_forwards``), so the state dict, ``.to()``, deep copies and ``torch.compile`` see the PyTorch modules.
The graphs are kept per model (converted once per run, seconds to tens of seconds, printed), checked against
PyTorch on the tracing example, and converted again if the weights change. Without openvino, or where a conversion
fails (remembered, so it is not retried), the model runs PyTorch and one line says why.
"""
from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

from errors import one_line

_EXAMPLE_SIZE = 320  # the example image's side for tracing (any multiple of 32; the graphs take any size)
_TOLERANCE = 1e-3  # the largest difference from PyTorch on the example, relative to the largest output value


@dataclass
class _Graph:
    """One converted module: its compiled graph, and how the graph's outputs become what the module returns."""

    compiled: Any
    pack: Callable[[list[torch.Tensor]], Any]

    def __call__(self, module: nn.Module, *inputs: Any) -> Any:
        """``module``'s forward by the graph; inputs with an empty dimension (no detections) run PyTorch's."""
        flat = [t for x in inputs for t in (x if isinstance(x, (list, tuple)) else [x])]
        if any(t.numel() == 0 for t in flat):
            return type(module).forward(module, *inputs)
        arrays = [np.ascontiguousarray(t.detach().float().cpu().numpy()) for t in flat]
        results = self.compiled(arrays)  # copies its outputs (OpenVINO's default), so they outlive the next call
        return self.pack([torch.from_numpy(results[output]) for output in self.compiled.outputs])


@dataclass
class _Converted:
    """What ``use_openvino`` made of one model: the graphs by module path, or why there are none."""

    graphs: dict[str, _Graph]
    failure: str
    weights: tuple


_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, _Converted]" = weakref.WeakKeyDictionary()


class _FlatLevels(nn.Module):
    """The RPN head with one input per FPN level and a flat output tuple (what ``openvino.convert_model`` traces)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, *levels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, deltas = self.head(list(levels))
        return (*logits, *deltas)


def converted_paths(model: nn.Module) -> list[str]:
    """The modules ``use_openvino`` runs with OpenVINO: the backbone, the RPN head, and every stack of RoI
    convolutions (torchvision's ``MaskRCNNHeads``: the mask head, DaCSeg's stage convolutions, the shape prior's
    refinement head)."""
    stacks = [f"roi_heads.{name}" for name, module in model.roi_heads.named_modules()
              if isinstance(module, MaskRCNNHeads)]
    return ["backbone", "rpn.head", *stacks]


def _weights(model: nn.Module) -> tuple:
    """Each parameter and buffer, and how often it was written in place: changes when weights are loaded or
    trained (not when ``.to()`` only changes their memory format)."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


def _compile(core: Any, module: nn.Module, example: tuple[torch.Tensor, ...], threads: int,
             expected: list[torch.Tensor], name: str) -> Any:
    """``module`` converted on ``example`` and compiled in float32, once its outputs on the example match
    PyTorch's ``expected`` in order, shape and value (else RuntimeError)."""
    import openvino

    with torch.no_grad():
        graph = openvino.convert_model(module, example_input=example if len(example) > 1 else example[0],
                                       share_weights=False)  # its own copy: the weights may change afterwards
    properties = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(graph, "CPU", properties)
    results = compiled([t.numpy() for t in example])
    found = [torch.from_numpy(results[output]) for output in compiled.outputs]
    if [f.shape for f in found] != [e.shape for e in expected]:
        raise RuntimeError(f"the converted {name} returns shapes {[tuple(f.shape) for f in found]}, PyTorch's "
                           f"{[tuple(e.shape) for e in expected]}")
    scale = max(float(e.abs().max()) for e in expected)
    worst = max(float((f - e).abs().max()) for f, e in zip(found, expected))
    if worst > _TOLERANCE * max(scale, 1.0):
        raise RuntimeError(f"the converted {name} differs from PyTorch by {worst:.3g} (outputs up to {scale:.3g})")
    return compiled


def _convert(model: nn.Module, threads: int) -> dict[str, _Graph]:
    """The graphs of ``converted_paths(model)``, traced on a random example image and random RoIs."""
    import openvino

    core = openvino.Core()
    backbone, rpn_head = model.backbone, model.rpn.head
    image = torch.rand(1, 3, _EXAMPLE_SIZE, _EXAMPLE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = backbone(image)
        logits, deltas = rpn_head(list(features.values()))
    names, levels = list(features), tuple(features.values())
    compiled = _compile(core, backbone, (image,), threads, list(levels), "backbone")
    graph_names = [sorted(output.get_names()) for output in compiled.outputs]
    if graph_names != [[name] for name in names]:  # the graph names its outputs by the feature maps' keys
        raise RuntimeError(f"the converted backbone's outputs are {graph_names}, not the feature maps {names}")
    count = len(levels)
    graphs = {"backbone": _Graph(compiled, lambda out: OrderedDict(zip(names, out))),
              "rpn.head": _Graph(_compile(core, _FlatLevels(rpn_head), levels, threads, [*logits, *deltas],
                                          "RPN head"), lambda out: (out[:count], out[count:]))}
    for path in converted_paths(model)[2:]:
        stack = model.get_submodule(path)
        channels = next(m.in_channels for m in stack.modules() if isinstance(m, nn.Conv2d))
        rois = torch.rand(2, channels, 14, 14, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = stack(rois)
        graphs[path] = _Graph(_compile(core, stack, (rois,), threads, [expected], path), lambda out: out[0])
    return graphs


def use_openvino(model: nn.Module, threads: int | None = None, log: Callable[[str], None] = print) -> bool:
    """Get ``model``'s OpenVINO graphs ready for ``openvino_forwards``; returns whether it can run them. The first
    call for a model (or after its weights changed) converts and compiles them, printed; where that fails, or
    openvino is missing, one line says why and the model runs PyTorch."""
    if next(model.parameters()).device.type != "cpu":
        log(f"OpenVINO runs here on the CPU; the model is on {next(model.parameters()).device}: running PyTorch")
        return False
    known = _CONVERTED.get(model)
    if known is not None and known.weights == _weights(model):
        if known.failure:
            log(known.failure)
        return not known.failure
    try:
        import openvino  # noqa: F401
    except ImportError:
        log("openvino is not installed (pip install openvino): running PyTorch")
        return False
    start = time.perf_counter()
    try:
        with torch.inference_mode(False):  # detect may ask, inside its inference mode; tracing needs normal tensors
            graphs, failure = _convert(model, threads or torch.get_num_threads()), ""
    except Exception as exc:  # OpenVINO's and the tracer's own error types: fall back, in one line
        graphs, failure = {}, (f"OpenVINO could not convert the model ({type(exc).__name__}: "
                               f"{one_line(exc)[:300]}): running PyTorch")
    _CONVERTED[model] = _Converted(graphs, failure, _weights(model))
    log(failure or f"OpenVINO runs the backbone, the RPN head and {len(graphs) - 2} stack(s) of RoI convolutions "
                   f"in float32 (converted in {time.perf_counter() - start:.1f} s)")
    return not failure


@contextlib.contextmanager
def openvino_forwards(model: nn.Module) -> Iterator[None]:
    """For the block, ``model``'s converted modules run their OpenVINO graphs (``use_openvino`` first; the graphs
    of stale weights are converted again)."""
    known = _CONVERTED.get(model)
    if (known is None or known.weights != _weights(model)) and not use_openvino(model):
        yield
        return
    graphs = _CONVERTED[model].graphs
    saved = {}
    try:
        for path, graph in graphs.items():
            module = model.get_submodule(path)
            saved[path] = module.__dict__.get("forward")  # torch.compile's wrapper keeps its own there
            module.forward = functools.partial(graph, module)
        yield
    finally:
        for path, forward in saved.items():
            module = model.get_submodule(path)
            if forward is None:
                del module.forward
            else:
                module.forward = forward
