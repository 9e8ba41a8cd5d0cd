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

The same graph converted to OpenVINO IR (``tools/export.py --format openvino``: ``model.xml`` and its weights
``model.bin``, the metadata in the IR's runtime info under the same key) runs with OpenVINO
(``OpenVinoDetector``), compiled in exact float32: ``INFERENCE_PRECISION_HINT`` is set to ``f32``, since OpenVINO's
CPU plugin otherwise runs bfloat16 on CPUs with AMX or AVX-512 BF16. ``load_exported_model`` picks the runtime by
the file's suffix (``EXPORTED_SUFFIXES``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from errors import UserError, one_line
from my_dataset_chromosome import DatasetError
from network_files.config import ModelConfig

METADATA_KEY = "dacseg"
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
CHECKPOINT_KEYS = ("model_config", "label_names", "label_to_cat_id", "stain", "epoch")
EXPORTED_SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino"}


def output_names(config: ModelConfig) -> list[str]:
    return [*OUTPUT_NAMES, *(["overlap_scores"] if config.name == "dacseg" else [])]


@dataclass(frozen=True)
class OrtOptions:
    """onnxruntime session options (``bench/bench_infer.py --ort-options`` measures them): ``level`` the graph
    optimisation level (``all``, ``extended``, ``basic``, ``none``); ``spinning`` lets idle intra-op threads
    busy-wait for work (onnxruntime's default; off, they sleep, and leave the cores to the threads reading and
    writing images); ``arena`` the CPU memory arena (on: allocations are reused between images)."""

    level: str = "all"
    spinning: bool = False
    arena: bool = True


ORT_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
              "none": "ORT_DISABLE_ALL"}


def parse_metadata(path: str | os.PathLike, raw: str | None) -> tuple[dict[str, Any], ModelConfig]:
    """The checkpoint metadata ``tools/export.py`` stored in an exported model, and its model config."""
    if raw is None:
        raise UserError(f"{path} was not exported by tools/export.py (no {METADATA_KEY!r} metadata)")
    try:
        checkpoint = json.loads(raw)
        return checkpoint, ModelConfig.from_dict(checkpoint["model_config"])
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path}: unreadable {METADATA_KEY!r} metadata ({one_line(exc)})") from None


class ExportedDetector:
    """An exported model on the CPU: ``detector(images)`` returns torchvision's inference outputs, keeping the
    detections scoring above ``score_thresh`` as torchvision does (``inference.detect.prepare_model`` sets it; the
    model's own ``box_score_thresh`` until then). Subclasses set ``checkpoint``, ``config``, ``names`` and
    ``run_graph`` (one ``[3, H, W]`` float32 array to the graph's outputs in ``names`` order)."""

    backend = ""
    checkpoint: dict[str, Any]
    config: ModelConfig
    names: list[str]

    def eval(self) -> "ExportedDetector":
        return self

    def run_graph(self, image: np.ndarray) -> Sequence[np.ndarray]:
        raise NotImplementedError

    def __call__(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            try:
                values = self.run_graph(np.ascontiguousarray(image.detach().float().cpu().numpy()))
            except Exception as exc:  # the runtime's own error types: this image cannot be predicted
                raise DatasetError(f"{self.backend} failed on a {image.shape[-1]}x{image.shape[-2]} image: "
                                   f"{one_line(exc)}") from None
            output = {name: torch.from_numpy(np.asarray(value)) for name, value in zip(self.names, values)}
            keep = output["scores"] > self.score_thresh
            outputs.append({name: value[keep] for name, value in output.items()})
        return outputs


class OnnxDetector(ExportedDetector):
    """An exported ONNX model run by onnxruntime on the CPU with ``OrtOptions``."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, options: OrtOptions = OrtOptions()
                 ) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"{path} is an ONNX model; running it needs onnxruntime (pip install onnxruntime)") \
                from None
        if options.level not in ORT_LEVELS:
            raise UserError(f"unknown graph optimisation level {options.level!r}; choose from {', '.join(ORT_LEVELS)}")
        session_options = onnxruntime.SessionOptions()
        level = getattr(onnxruntime.GraphOptimizationLevel, ORT_LEVELS[options.level])
        session_options.graph_optimization_level = level
        session_options.enable_cpu_mem_arena = options.arena
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spinning else "0")
        if threads:
            session_options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types
            raise UserError(f"cannot load ONNX model {path}: {one_line(exc)}") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.checkpoint, self.config = parse_metadata(path, raw)
        self.names = [output.name for output in self.session.get_outputs()]
        self.score_thresh = self.config.box_score_thresh

    def run_graph(self, image: np.ndarray) -> Sequence[np.ndarray]:
        return self.session.run(None, {INPUT_NAME: image})


class OpenVinoDetector(ExportedDetector):
    """An exported model in OpenVINO IR (``.xml``; or the ``.onnx`` file itself, read by OpenVINO) compiled for the
    CPU in exact float32. With ``static_shapes``, the graph is compiled once per image size with that size fixed
    (each new size costs a compilation); otherwise once, for any size."""

    backend = "openvino"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, static_shapes: bool = False) -> None:
        try:
            import openvino
        except ImportError:
            raise UserError(f"{path} is an OpenVINO model; running it needs openvino (pip install openvino)") from None
        self.core = openvino.Core()
        self.properties = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        try:
            self.model = self.core.read_model(str(path))
        except Exception as exc:  # OpenVINO's own error types
            raise UserError(f"cannot load OpenVINO model {path}: {one_line(exc)}") from None
        if self.model.has_rt_info([METADATA_KEY]):
            raw = self.model.get_rt_info([METADATA_KEY]).astype(str)
        else:
            raw = _onnx_metadata(path) if Path(path).suffix.lower() == ".onnx" else None
        self.checkpoint, self.config = parse_metadata(path, raw)
        self.names = [output.get_any_name() for output in self.model.outputs]
        self.score_thresh = self.config.box_score_thresh
        self.static_shapes = static_shapes
        self.compiled: dict[tuple[int, ...] | None, Any] = {}
        if not static_shapes:
            self.compiled[None] = self._compile(self.model, path)

    def _compile(self, model, what: Any) -> Any:
        try:
            return self.core.compile_model(model, "CPU", self.properties)
        except Exception as exc:  # OpenVINO's own error types
            raise UserError(f"OpenVINO cannot compile {what}: {one_line(exc)}") from None

    def run_graph(self, image: np.ndarray) -> Sequence[np.ndarray]:
        key = tuple(image.shape) if self.static_shapes else None
        if key not in self.compiled:
            model = self.model.clone()
            model.reshape({INPUT_NAME: list(image.shape)})
            self.compiled[key] = self._compile(model, f"the model for a {image.shape[2]}x{image.shape[1]} image")
        return list(self.compiled[key](image).values())


def _onnx_metadata(path: str | os.PathLike) -> str | None:
    """The ``dacseg`` metadata of an ONNX file (OpenVINO does not carry ONNX metadata into its model)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((prop.value for prop in model.metadata_props if prop.key == METADATA_KEY), None)


def load_onnx_model(path: str | os.PathLike, threads: int | None = None
                    ) -> tuple[OnnxDetector, ModelConfig, dict[str, Any]]:
    """An exported model, its config and its checkpoint metadata (label names, stain polarity, ...)."""
    if not Path(path).is_file():
        raise UserError(f"ONNX model not found: {path}")
    detector = OnnxDetector(path, threads)
    return detector, detector.config, detector.checkpoint


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model (``predict.py`` runs it instead of loading a checkpoint)."""
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES


def load_exported_model(path: str | os.PathLike, threads: int | None = None
                        ) -> tuple[ExportedDetector, ModelConfig, dict[str, Any]]:
    """An exported model run by the runtime its suffix names (``.onnx`` onnxruntime, ``.xml`` OpenVINO), its config
    and its checkpoint metadata."""
    if Path(path).suffix.lower() == ".onnx":
        return load_onnx_model(path, threads)
    if not Path(path).is_file():
        raise UserError(f"OpenVINO model not found: {path}")
    detector = OpenVinoDetector(path, threads)
    return detector, detector.config, detector.checkpoint
