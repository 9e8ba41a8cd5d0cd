"""Model configuration, the Mask R-CNN / DaCSeg builder and detector weight loading."""
from __future__ import annotations

from backbone import LoadReport, WeightsError
from network_files.builder import build_model, load_detector_weights, resolve_config
from network_files.config import DACSEG_LOSS_NAMES, ModelConfig

__all__ = [
    "DACSEG_LOSS_NAMES",
    "LoadReport",
    "ModelConfig",
    "WeightsError",
    "build_model",
    "load_detector_weights",
    "resolve_config",
]
