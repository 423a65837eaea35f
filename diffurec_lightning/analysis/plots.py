"""The analysis figures, drawn with matplotlib's object API (no pyplot state, no display).

Every figure has a fixed size in pixels (FIG_DPI times its size in inches), so files stay small
and comparable across runs; every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from diffurec_lightning.io import write_atomic

FIG_DPI = 100
WIDE = (10.0, 4.0)  # inches: 1000 x 400 px
SQUARE = (6.0, 6.0)  # 600 x 600 px

# (title, category labels, {series label: one value per category})
BarPanel = tuple[str, Sequence[str], dict[str, Sequence[float]]]
# (title, x label, x values, {series label: one value per x})
CurvePanel = tuple[str, str, Sequence[float], dict[str, Sequence[float]]]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write the figure as PNG atomically (readers never see half a file)."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=FIG_DPI))


def grouped_bar_chart(panels: Sequence[BarPanel], path: str | Path, title: str = "") -> Path:
    """Side-by-side panels of grouped bars (one bar per series within each category)."""
    fig = Figure(figsize=WIDE)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, categories, series) in zip(axes, panels, strict=True):
        x = np.arange(len(categories))
        width = 0.8 / max(len(series), 1)
        for i, (label, values) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * width
            ax.bar(x + offset, np.nan_to_num(np.asarray(values, float)), width, label=label)
        top = max(
            (np.nanmax(np.asarray(v, float), initial=0.0) for v in series.values()), default=0
        )
        ax.set_ylim(0, 1.2 * top if top > 0 else 1.0)  # headroom keeps the legend off the bars
        ax.set_xticks(x, list(categories), fontsize=8)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right", ncol=max(len(series), 1))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def line_chart(
    panels: Sequence[CurvePanel], path: str | Path, title: str = "", log_x: bool = True
) -> Path:
    """Side-by-side panels of metric curves against a numeric x (``log_x``: a log2 axis, for
    1, 2, 4, ... steps; otherwise linear, for epochs)."""
    fig = Figure(figsize=WIDE)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, xlabel, x, series) in zip(axes, panels, strict=True):
        for label, values in series.items():
            ax.plot(list(x), list(values), marker="o", label=label)
        if log_x:
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(x), [str(v) for v in x])
        ax.set_xlabel(xlabel)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def embedding_scatter(
    points: np.ndarray,
    clusters: np.ndarray,
    is_head: np.ndarray,
    path: str | Path,
    title: str = "",
) -> Path:
    """2-D points coloured by cluster; circles for head-target users, crosses for tail ones."""
    fig = Figure(figsize=SQUARE)
    ax = fig.subplots()
    palette = matplotlib.colormaps["tab10"]
    colours = np.asarray([palette(int(c) % 10) for c in clusters])  # (n, 4) RGBA
    for head, marker, label in ((True, "o", "head target"), (False, "x", "long-tail target")):
        sel = is_head == head
        ax.scatter(points[sel, 0], points[sel, 1], c=colours[sel], marker=marker, s=12, alpha=0.75)
        ax.scatter([], [], c="grey", marker=marker, label=label)  # neutral legend entry
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "t-SNE of reconstructed x0 (colour = k-means cluster)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
