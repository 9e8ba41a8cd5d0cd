"""Exported models (``tools/export.py``): exporting a checkpoint's model to ONNX with what ``predict.py`` needs to
know about it, and running such a file with onnxruntime behind the interface ``inference.detect`` calls.

The ONNX graph takes one ``image`` ``[3, H, W]`` float32 in 0..1 of any size and returns ``boxes`` ``[N, 4]``,
``labels`` ``[N]``, ``scores`` ``[N]``, ``masks`` ``[N, 1, H, W]`` probabilities at the image's size and, for
DaCSeg, ``overlap_scores`` ``[N]``. The file's metadata (key ``dacseg``) holds the checkpoint's model config, label
names and ids, stain polarity and epoch as JSON, so ``predict.py --weights-path model.onnx`` needs nothing else.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from errors import UserError, one_line
from network_files.config import ModelConfig

METADATA_KEY = "dacseg"
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
CHECKPOINT_KEYS = ("model_config", "label_names", "label_to_cat_id", "stain", "epoch")


def output_names(config: ModelConfig) -> list[str]:
    return [*OUTPUT_NAMES, *(["overlap_scores"] if config.name == "dacseg" else [])]


def export_onnx(model: torch.nn.Module, config: ModelConfig, checkpoint: Mapping[str, Any], example: torch.Tensor,
                path: str | os.PathLike, opset: int = 17) -> Path:
    """Export the eval-mode ``model`` (traced on ``example``, any size works afterwards) to ``path`` with the
    checkpoint's metadata; raises ``UserError`` (one line) when the export fails."""
    import onnx

    path = Path(path)
    names = output_names(config)
    dynamic = {INPUT_NAME: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in names}}
    try:
        with warnings.catch_warnings():  # tracing warns at every data-dependent line of torchvision's detection code
            warnings.simplefilter("ignore")
            torch.onnx.export(model, ([example],), str(path), opset_version=opset, dynamo=False,
                              input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic)
    except Exception as exc:  # the exporter raises many kinds; the user needs one line
        raise UserError(f"ONNX export of the {config.name} model failed: {one_line(exc)}") from None
    exported = onnx.load(str(path))
    info = {key: checkpoint.get(key) for key in CHECKPOINT_KEYS}
    info["model_config"] = config.to_dict()
    exported.metadata_props.add(key=METADATA_KEY, value=json.dumps(info))
    onnx.save(exported, str(path))
    return path


class OnnxDetector:
    """An exported model run by onnxruntime on the CPU: ``detector(images)`` returns torchvision's inference outputs,
    keeping the detections scoring at least ``score_thresh`` (``inference.detect.prepare_model`` sets it)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"{path} is an ONNX model; running it needs onnxruntime (pip install onnxruntime)") \
                from None
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types
            raise UserError(f"cannot load ONNX model {path}: {one_line(exc)}") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise UserError(f"{path} was not exported by tools/export.py (no {METADATA_KEY!r} metadata)")
        self.checkpoint = json.loads(raw)
        self.config = ModelConfig.from_dict(self.checkpoint["model_config"])
        self.names = [output.name for output in self.session.get_outputs()]
        self.score_thresh = 0.0

    def eval(self) -> "OnnxDetector":
        return self

    def __call__(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            values = self.session.run(None, {INPUT_NAME: image.detach().float().cpu().numpy()})
            output = {name: torch.from_numpy(value) for name, value in zip(self.names, values)}
            keep = output["scores"] >= self.score_thresh
            outputs.append({name: value[keep] for name, value in output.items()})
        return outputs


def load_onnx_model(path: str | os.PathLike, threads: int | None = None
                    ) -> tuple[OnnxDetector, ModelConfig, dict[str, Any]]:
    """An exported model, its config and its checkpoint metadata (label names, stain polarity, ...)."""
    if not Path(path).is_file():
        raise UserError(f"ONNX model not found: {path}")
    detector = OnnxDetector(path, threads)
    return detector, detector.config, detector.checkpoint
