"""Exported models: running an ONNX file written by ``tools/export.py`` with onnxruntime behind the interface
``inference.detect`` calls.

The ONNX graph takes one ``image`` ``[3, H, W]`` float32 in 0..1 of any size and returns ``boxes`` ``[N, 4]``,
``labels`` ``[N]``, ``scores`` ``[N]``, ``masks`` ``[N, 1, H, W]`` probabilities at the image's size and, for
DaCSeg, ``overlap_scores`` ``[N]``, every detection up to the model's ``box_detections_per_img`` (the graph is
exported with score threshold 0; the detector applies its own). ``inference.detect`` keeps each mask only over its
box (``train_utils.masks``), but the graph itself pastes every mask at the image's size, so running an exported
model still takes 4 bytes per pixel for each detection the graph returns. The file's metadata (key ``dacseg``)
holds the checkpoint's model config, label names and ids, stain polarity and epoch as JSON, so ``predict.py
--weights-path model.onnx`` needs nothing else.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from errors import UserError, one_line
from my_dataset_chromosome import DatasetError
from network_files.config import ModelConfig

METADATA_KEY = "dacseg"
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
CHECKPOINT_KEYS = ("model_config", "label_names", "label_to_cat_id", "stain", "epoch")


def output_names(config: ModelConfig) -> list[str]:
    return [*OUTPUT_NAMES, *(["overlap_scores"] if config.name == "dacseg" else [])]


class OnnxDetector:
    """An exported model run by onnxruntime on the CPU: ``detector(images)`` returns torchvision's inference outputs,
    keeping the detections scoring above ``score_thresh`` as torchvision does (``inference.detect.prepare_model``
    sets it; the model's own ``box_score_thresh`` until then)."""

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
        try:
            self.checkpoint = json.loads(raw)
            self.config = ModelConfig.from_dict(self.checkpoint["model_config"])
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{path}: unreadable {METADATA_KEY!r} metadata ({one_line(exc)})") from None
        self.names = [output.name for output in self.session.get_outputs()]
        self.score_thresh = self.config.box_score_thresh

    def eval(self) -> "OnnxDetector":
        return self

    def __call__(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            try:
                values = self.session.run(None, {INPUT_NAME: image.detach().float().cpu().numpy()})
            except Exception as exc:  # onnxruntime's own error types: this image cannot be predicted
                raise DatasetError(f"onnxruntime failed on a {image.shape[-1]}x{image.shape[-2]} image: "
                                   f"{one_line(exc)}") from None
            output = {name: torch.from_numpy(value) for name, value in zip(self.names, values)}
            keep = output["scores"] > self.score_thresh
            outputs.append({name: value[keep] for name, value in output.items()})
        return outputs


def load_onnx_model(path: str | os.PathLike, threads: int | None = None
                    ) -> tuple[OnnxDetector, ModelConfig, dict[str, Any]]:
    """An exported model, its config and its checkpoint metadata (label names, stain polarity, ...)."""
    if not Path(path).is_file():
        raise UserError(f"ONNX model not found: {path}")
    detector = OnnxDetector(path, threads)
    return detector, detector.config, detector.checkpoint
