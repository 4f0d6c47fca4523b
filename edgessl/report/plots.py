"""Plots written into run directories (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fit_title(fig, title: str, size: float = 12.0) -> None:
    """A suptitle that fits the figure's width: the font shrinks (down to 6 pt) until the widest line fits."""
    text = fig.suptitle(title, fontsize=size)
    renderer = fig.canvas.get_renderer()
    width = fig.get_window_extent(renderer).width * 0.96
    extent = text.get_window_extent(renderer).width
    if extent > width:
        text.set_fontsize(max(6.0, size * width / extent))


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """curves.png: training loss per epoch (left) and kNN top-1 per epoch when measured (right)."""
    fig = curves_figure(history, title)
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def curves_figure(history: list[dict[str, Any]], title: str = ""):
    plt = _plt()
    knn = [h for h in history if h.get("knn_top1") is not None]
    fig, axes = plt.subplots(1, 2 if knn else 1, figsize=(10 if knn else 5, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o", label="loss")
    if any("loss_ce" in h for h in history):
        ax.plot([h["epoch"] for h in history], [h["loss_ce"] for h in history], ls="--", label="L_ce")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if knn:
        ax = axes[0, 1]
        for key, label in (("knn_top1", "kNN top-1 (k=20)"), ("knn_top1_k200", "kNN top-1 (k=200)")):
            pts = [(h["epoch"], h[key]) for h in knn if h.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fit_title(fig, title)
    fig.tight_layout()
    return fig
