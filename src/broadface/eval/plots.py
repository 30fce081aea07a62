"""Evaluation plots as PNG files (matplotlib, Agg canvas, no pyplot global state).

* :func:`plot_roc` — TAR vs FAR on a log FAR axis, one labelled curve per model/set;
* :func:`plot_cmc` — identification rate vs rank;
* :func:`plot_learning_curves` — one panel per metric, ``name -> [(step, value), ...]`` (or ``name -> {label:
  points}``: several lines in one panel).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["plot_roc", "plot_cmc", "plot_learning_curves"]


def _figure(width: float = 6.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _as_roc(value: Any) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), or an eval result / pair with ``scores`` and ``issame`` -> its ROC."""
    from broadface.metrics import roc

    if isinstance(value, Mapping) and "scores" in value and "issame" in value:
        fpr, tpr, _ = roc(value["scores"], value["issame"])
        return fpr, tpr
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return np.asarray(value[0], dtype=float), np.asarray(value[1], dtype=float)
    raise ValueError("plot_roc curves must be (fpr, tpr) pairs or dicts with 'scores' and 'issame'")


def plot_roc(curves: Mapping[str, Any], path: str | os.PathLike, *, title: str = "ROC",
             far_range: tuple[float, float] = (1e-6, 1.0)) -> Path:
    """Save TAR vs FAR (log axis) for ``{label: (fpr, tpr) or eval result}``.

    Points at FAR 0 cannot be drawn on a log axis; the axis starts at ``far_range[0]``
    or just below the smallest non-zero FAR of the curves, whichever is larger.
    """
    if not curves:
        raise ValueError("plot_roc: no curves given")
    fig = _figure()
    ax = fig.add_subplot()
    smallest = far_range[1]
    for label, value in curves.items():
        fpr, tpr = _as_roc(value)
        keep = fpr > 0
        if keep.any():
            smallest = min(smallest, float(fpr[keep].min()))
        ax.plot(fpr[keep], tpr[keep], label=str(label), linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlim(max(far_range[0], smallest / 2), far_range[1])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False accept rate (FAR)")
    ax.set_ylabel("True accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", linestyle=":", linewidth=0.5)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_cmc(curves: Mapping[str, Mapping[int, float]], path: str | os.PathLike, *, title: str = "CMC") -> Path:
    """Save identification rate vs rank for ``{label: {rank: rate}}``."""
    if not curves:
        raise ValueError("plot_cmc: no curves given")
    fig = _figure()
    ax = fig.add_subplot()
    for label, points in curves.items():
        ranks = sorted(int(r) for r in points)
        ax.plot(ranks, [points[r] for r in ranks], marker="o", markersize=3, label=str(label))
    ax.set_xscale("log")
    ticks = sorted({int(r) for points in curves.values() for r in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("Rank")
    ax.set_ylabel("Identification rate")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.grid(True, which="both", linestyle=":", linewidth=0.5)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_learning_curves(series: Mapping[str, Sequence[tuple[float, float]] | Mapping[str, Sequence]],
                         path: str | os.PathLike, *, title: str = "Training", log_scale: Sequence[str] = ()) -> Path:
    """Save one panel per metric from ``{name: [(step, value), ...]}``; a value ``{label: [(step, value), ...]}``
    draws those lines in one panel with a legend (arms compared on one axis). Names in ``log_scale`` get a
    log y axis."""
    panels = {name: dict(v) if isinstance(v, Mapping) else {None: v} for name, v in series.items()}
    panels = {k: {lab: pts for lab, pts in v.items() if len(pts)} for k, v in panels.items()}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        raise ValueError("plot_learning_curves: no non-empty series given")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.0 * cols, 3.0 * rows)
    for i, (name, lines) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, points in lines.items():
            pts = np.asarray(points, dtype=float)
            if pts.ndim != 2 or pts.shape[1] != 2:
                what = repr(name) if label is None else f"{name!r} / {label!r}"
                raise ValueError(f"plot_learning_curves: series {what} must be a list of (step, value) pairs")
            ax.plot(pts[:, 0], pts[:, 1], marker="." if len(pts) < 50 else None, label=label)
        if any(label is not None for label in lines):
            ax.legend(fontsize=8)
        if name in log_scale:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, linestyle=":", linewidth=0.5)
    fig.suptitle(title)
    return _save(fig, path)
