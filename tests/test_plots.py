"""The training plots render from metrics.jsonl records, with or without evaluation."""
from __future__ import annotations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from train_utils.outputs import plots


def _records():
    out = []
    for epoch in range(4):
        record = {"epoch": epoch, "lr": 0.02 * (0.5 ** epoch), "loss": 3.0 / (epoch + 1),
                  "loss_classifier": 1.0 / (epoch + 1), "loss_mask": 2.0 / (epoch + 1)}
        if epoch % 2 == 1:  # evaluated every second epoch
            record["bbox"] = {"AP": 0.1 * epoch, "AP50": 0.2 * epoch}
            record["segm"] = {"AP": 0.12 * epoch, "AP50": 0.25 * epoch}
        out.append(record)
    return out


def _is_png(path, size=(800, 500)):
    with Image.open(path) as im:
        return im.format == "PNG" and im.size == size


def test_plot_all_writes_both_pngs(tmp_path):
    paths = plots.plot_all(_records(), tmp_path / "out")
    assert [p.name for p in paths] == [plots.LOSS_AND_LR_PNG, plots.MAP_PNG]
    assert _is_png(paths[0], (800, 600)) and _is_png(paths[1])
    assert not list((tmp_path / "out").glob("*.tmp*"))


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_loss_figure_draws_every_term_and_the_lr():
    fig = plots.loss_and_lr_figure(_records())
    loss_ax, lr_ax = fig.axes
    lines = _lines(loss_ax)
    assert lines["loss (total)"] == ([0, 1, 2, 3], pytest.approx([3.0, 1.5, 1.0, 0.75]))
    assert set(lines) == {"loss (total)", "loss_classifier", "loss_mask"}
    assert _lines(lr_ax)["learning rate"] == ([0, 1, 2, 3], pytest.approx([0.02, 0.01, 0.005, 0.0025]))
    assert loss_ax.get_yscale() == "log"  # the terms differ by orders of magnitude
    # a zero loss term cannot go on a log axis: the plot falls back to linear
    zero = plots.loss_and_lr_figure([dict(r, loss_mask=0.0) for r in _records()])
    assert zero.axes[0].get_yscale() == "linear"


def test_map_figure_draws_the_evaluated_epochs_only():
    lines = _lines(plots.map_figure(_records()).axes[0])
    assert lines["segm AP@[.5:.95]"] == ([1, 3], pytest.approx([0.12, 0.36]))
    assert lines["bbox AP50"] == ([1, 3], pytest.approx([0.2, 0.6]))
    assert set(lines) == {"bbox AP@[.5:.95]", "bbox AP50", "segm AP@[.5:.95]", "segm AP50"}


def test_plots_without_evaluation_or_records(tmp_path):
    no_eval = [{k: v for k, v in r.items() if k not in ("bbox", "segm")} for r in _records()]
    empty = plots.map_figure(no_eval).axes[0]
    assert _lines(empty) == {} and [t.get_text() for t in empty.texts] == ["no evaluation yet"]
    assert _is_png(plots.plot_map(no_eval, tmp_path / "m.png"))
    assert _is_png(plots.plot_loss_and_lr([], tmp_path / "l.png"), (800, 600))


def test_epoch_ticks_are_integers_and_thinned():
    assert plots._epoch_ticks([0, 1, 2]) == [0, 1, 2]
    ticks = plots._epoch_ticks(list(range(100)))
    assert len(ticks) <= 15 and ticks[0] == 0 and all(isinstance(t, int) for t in ticks)


def test_loss_legend_sits_below_the_axes_where_it_hides_no_curve():
    records = [{**r, "loss_overlap": 0.5, "loss_overlap_edge": 0.4} for r in _records()]
    fig = plots.loss_and_lr_figure(records)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert {t.get_text() for t in legend.get_texts()} >= {"loss (total)", "loss_overlap", "learning rate"}
    renderer = canvas.get_renderer()
    legend_box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend_box.y1 < axes_box.y0 and legend_box.y0 >= 0  # under the plot, inside the figure
