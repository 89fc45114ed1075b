"""Training-curve figure for a run (matplotlib, imported only when a plot is drawn).

The figure is drawn on an Agg canvas object directly, without ``pyplot``: no global backend
switch, no window, safe in threads and on machines without a display.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from uts_cli.errors import InputDataError
from uts_cli.io.atomic import atomic_write_bytes


def _read_columns(history_csv: Path) -> dict[str, list[float | None]]:
    if not history_csv.is_file():
        raise InputDataError(f"history file not found: {history_csv}",
                             hint="train the run first (`uts teach`); history.csv is written per epoch")
    with open(history_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "epoch" not in rows[0]:
        raise InputDataError(f"history file has no epochs: {history_csv}",
                             hint="wait for the first epoch to finish")

    def num(v: str | None) -> float | None:
        return None if v in (None, "") else float(v)

    return {k: [num(r.get(k)) for r in rows] for k in rows[0] if k != "timestamp"}


def plot_history(history_csv: str | os.PathLike, out_png: str | os.PathLike, monitor: str | None = None) -> Path:
    """Draw loss, validation image-level F1/precision/recall and (when recorded) the region-level
    localization F1/precision/recall with its pixel threshold, per epoch, into a PNG.

    The star marks the best epoch of the localization F1 when the history has it, else of the
    image-level F1.

    Args:
        history_csv: a run's ``history.csv``.
        out_png: where to write the figure (atomically).
        monitor: the column that chose the best checkpoint (``val_loc_f1`` or ``val_f1``); None:
            the localization F1 when recorded.

    Returns:
        The PNG path.

    Raises:
        InputDataError: the history file is missing or empty.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = _read_columns(Path(history_csv))
    epochs = cols["epoch"]
    has_loc = any(v is not None for v in cols.get("val_loc_f1") or [])
    fig = Figure(figsize=(13.5 if has_loc else 9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if has_loc else 2)
    ax_loss, ax_f1 = axes[0], axes[1]
    for key, label in (("train_loss", "train loss"), ("loss_ce", "image loss"), ("loss_location", "location"),
                       ("val_loss", "val loss")):
        _line(ax_loss, epochs, cols.get(key), label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    for key, label in (("val_f1", "F1"), ("val_precision", "precision"), ("val_recall", "recall")):
        _line(ax_f1, epochs, cols.get(key), label)
    ax_f1.set_ylim(0, 1.02)
    ax_f1.set_xlabel("epoch")
    ax_f1.set_title("validation (image level)")
    monitor, ax_best = "val_f1", ax_f1
    if has_loc:
        ax_loc = axes[2]
        for key, label in (("val_loc_f1", "F1"), ("val_loc_precision", "precision"), ("val_loc_recall", "recall"),
                           ("val_loc_threshold", "pixel threshold")):
            _line(ax_loc, epochs, cols.get(key), label)
        ax_loc.set_ylim(0, 1.02)
        ax_loc.set_xlabel("epoch")
        ax_loc.set_title("validation (localization, region level)")
        if monitor != "val_f1":
            monitor, ax_best = "val_loc_f1", ax_loc
    f1 = [(v, e) for v, e in zip(cols.get(monitor) or [], epochs) if v is not None]
    if f1:
        best, at = max(f1, key=lambda t: (t[0], t[1]))
        ax_best.scatter([at], [best], marker="*", s=120, color="black", zorder=3, label=f"best {best:.3f}")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(out_png)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _line(ax, epochs, values, label: str) -> None:
    if not values:
        return
    pts = [(e, v) for e, v in zip(epochs, values) if v is not None]
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=label)
