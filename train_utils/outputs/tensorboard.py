"""Optional TensorBoard logging (``--tensorboard``): the numbers of ``metrics.jsonl``, written on process 0 only.

Every step is the run's global batch index (epoch x batches per epoch + batch). Per logged batch (every
``--print-freq``): ``train/<loss term>`` and ``train/lr``. Per epoch, at its last batch: ``epoch/<loss term>`` (the
epoch means, lr, images/s...) and ``val/<metric>`` for the validation record (segm and bbox AP family, precision /
recall / F1, overlap and non-overlap subsets, count errors).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from errors import UserError
from train_utils.outputs.files import check_output_dir

TENSORBOARD_DIR = "tensorboard"
_RECORD_SCALARS = ("precision", "recall", "f1", "count_mae", "count_exact", "count_bias")
_SUBSET_SCALARS = ("AP", "AP50", "AP75", "precision", "recall", "f1")


class TensorBoardLog:
    """A ``SummaryWriter`` on ``log_dir``; a resumed run appends to it, replacing what lay after ``purge_step``."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        try:
            self.writer = _summary_writer()(str(log_dir), purge_step=purge_step)
        except OSError as exc:
            raise UserError(f"--tensorboard: cannot write the log into {log_dir} ({exc.strerror or exc})") from None

    def iteration(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def epoch(self, step: int, stats: Mapping[str, float], record: Mapping[str, Any] | None) -> None:
        for name, value in stats.items():
            self.writer.add_scalar(f"epoch/{name}", value, step)
        for name, value in record_scalars(record or {}).items():
            self.writer.add_scalar(f"val/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def check_log_dir(log_dir: str | Path, flag: str = "--tensorboard-dir") -> None:
    """Refuse, creating nothing, what would stop ``TensorBoardLog`` on ``log_dir``: the package missing, a file
    where the log folder goes, or a folder that cannot be written (``UserError``, one line naming ``flag``)."""
    _summary_writer()
    try:
        check_output_dir(log_dir, flag)
    except OSError as exc:
        raise UserError(str(exc)) from None


def record_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The validation record's numbers, flat: ``segm_AP``, ``bbox_AP50``, ``overlap_segm_recall``, ``count_mae``..."""
    scalars: dict[str, float] = {}
    for iou_type in ("segm", "bbox"):
        for name, value in (record.get(iou_type) or {}).items():
            if isinstance(value, float):
                scalars[f"{iou_type}_{name}"] = value
    for subset in ("overlap_segm", "non_overlap_segm"):
        for name in _SUBSET_SCALARS:
            if name in (record.get(subset) or {}):
                scalars[f"{subset}_{name}"] = float(record[subset][name])
    scalars.update({name: float(record[name]) for name in _RECORD_SCALARS if name in record})
    return scalars
