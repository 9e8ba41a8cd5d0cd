"""Training curves from ``metrics.jsonl`` records: ``loss_and_lr.png`` and ``mAP.png`` (matplotlib, no display)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure  # a bare Figure renders with Agg; pyplot (and a display) is never needed

from train_utils.outputs.files import atomic_write

LOSS_AND_LR_PNG = "loss_and_lr.png"
MAP_PNG = "mAP.png"


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def plot_loss_and_lr(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """``loss_and_lr_figure`` saved as a PNG."""
    return _save(loss_and_lr_figure(records), path)


def loss_and_lr_figure(records: Sequence[Mapping[str, Any]]) -> Figure:
    """Mean training loss per epoch (total bold, each term thin; a log axis when every value is positive) and the
    learning rate on a second axis."""
    records = sorted((r for r in records if r.get("loss") is not None), key=lambda r: r["epoch"])
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(8, 6))
    ax = fig.add_subplot()
    ax.plot(epochs, [r["loss"] for r in records], "o-", color="tab:red", linewidth=2, label="loss (total)")
    terms = sorted({k for r in records for k in r if k.startswith("loss_")})
    for term in terms:
        ax.plot(epochs, [r.get(term) for r in records], linewidth=1, alpha=0.7, label=term)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    values = [r.get(k) for r in records for k in ["loss", *terms]]
    if values and all(isinstance(v, (int, float)) and v > 0 for v in values):
        ax.set_yscale("log")  # the terms differ by orders of magnitude, and so do early and late epochs
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [r.get("lr") for r in records], "s--", color="tab:blue", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    # below the axes, where it cannot hide a curve (a DaCSeg run has twelve entries)
    ax.legend(handles=handles, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4,
              frameon=False)
    ax.set_title("Training loss and learning rate")
    if epochs:
        ax.set_xticks(_epoch_ticks(epochs))
    fig.tight_layout()
    return fig


def plot_map(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """``map_figure`` saved as a PNG."""
    return _save(map_figure(records), path)


def map_figure(records: Sequence[Mapping[str, Any]]) -> Figure:
    """COCO AP and AP50 per evaluated epoch, for boxes and masks ("no evaluation yet" without any)."""
    records = sorted((r for r in records if isinstance(r.get("bbox"), Mapping)), key=lambda r: r["epoch"])
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for iou_type, color in (("bbox", "tab:orange"), ("segm", "tab:green")):
        rows = [r for r in records if isinstance(r.get(iou_type), Mapping)]
        if not rows:
            continue
        xs = [r["epoch"] for r in rows]
        ax.plot(xs, [r[iou_type].get("AP") for r in rows], "o-", color=color, label=f"{iou_type} AP@[.5:.95]")
        ax.plot(xs, [r[iou_type].get("AP50") for r in rows], "^--", color=color, label=f"{iou_type} AP50")
    ax.set_xlabel("epoch")
    ax.set_ylabel("average precision")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if records:
        ax.legend(fontsize="small", loc="lower right")
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Validation mAP")
    if epochs:
        ax.set_xticks(_epoch_ticks(epochs))
    fig.tight_layout()
    return fig


def _epoch_ticks(epochs: Sequence[int], most: int = 15) -> list[int]:
    """Integer epoch ticks, thinned to at most ``most``."""
    step = max(1, -(-(max(epochs) - min(epochs) + 1) // most))
    return list(range(min(epochs), max(epochs) + 1, step))


def plot_all(records: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> list[Path]:
    """Both plots into ``output_dir``."""
    output_dir = Path(output_dir)
    return [plot_loss_and_lr(records, output_dir / LOSS_AND_LR_PNG), plot_map(records, output_dir / MAP_PNG)]
