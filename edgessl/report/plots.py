"""Plots written into run directories (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib.pyplot on the Agg backend. A class or file name in a script its font lacks (CJK, emoji) is drawn
    as boxes without matplotlib's warning per glyph (one per missing character, every plot): the names are in the
    CSV and JSON files beside the picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
    return plt


def fit_title(fig, title: str, size: float = 12.0) -> None:
    """A suptitle that fits the figure's width: the font shrinks (down to 6 pt) until the widest line fits; a title
    still too wide at 6 pt is broken in two at the space nearest its middle, then shrunk again."""
    text = fig.suptitle(title, fontsize=size)
    renderer = fig.canvas.get_renderer()
    width = fig.get_window_extent(renderer).width * 0.96
    extent = text.get_window_extent(renderer).width
    if extent > width:
        text.set_fontsize(max(6.0, size * width / extent))
    if text.get_window_extent(renderer).width > width and "\n" not in title and " " in title:
        middle = len(title) // 2
        cut = min((i for i, c in enumerate(title) if c == " "), key=lambda i: abs(i - middle))
        fit_title(fig, f"{title[:cut]}\n{title[cut + 1:]}", size)


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """curves.png: training loss per epoch (left) and kNN top-1 per epoch when measured (right)."""
    fig = curves_figure(history, title)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def curves_figure(history: list[dict[str, Any]], title: str = ""):
    plt = pyplot()
    knn = [h for h in history if h.get("knn_top1") is not None]
    fig, axes = plt.subplots(1, 2 if knn else 1, figsize=(10 if knn else 5, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o", label="loss")
    if any("loss_ce" in h for h in history):
        ax.plot([h["epoch"] for h in history], [h["loss_ce"] for h in history], ls="--", label="L_ce")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if knn:
        ax = axes[0, 1]
        for key, label in (("knn_top1", "kNN top-1 (k=20)"), ("knn_top1_k200", "kNN top-1 (k=200)")):
            pts = [(h["epoch"], h[key]) for h in knn if h.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    _mark_epochs(axes[0], history)
    if title:
        fit_title(fig, title)
    fig.tight_layout()
    return fig


def _mark_epochs(axes, history: list[dict[str, Any]]) -> None:
    """Whole-epoch ticks on every panel, a dotted line labelled "resumed" where a --resume took over (after epoch
    N - 1 of a row marked resumed), a dashed one where a --widths run's smaller widths join (--slow-start: the loss
    sums their terms from there, a jump that is no divergence), then the legends."""
    from matplotlib.ticker import MaxNLocator

    resumed = [h["epoch"] - 1 for h in history if h.get("resumed")]
    slim = [any(k.startswith("loss_ce_w") for k in h) for h in history]
    joined = [h["epoch"] - 1 for h, now, before in zip(history[1:], slim[1:], slim[:-1], strict=True)
              if now and not before]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for i, x in enumerate(resumed):
            ax.axvline(x, color="0.5", ls=":", lw=1, label="resumed" if i == 0 else None)
        for x in joined:
            ax.axvline(x + 0.5, color="tab:red", ls="--", lw=1, label="smaller widths join the loss")
        ax.legend()


def plot_widths(entries: list[dict[str, Any]], path: str | Path, title: str = "", knn_k: int = 20) -> None:
    """widths.png: accuracy (kNN top-1, else linear probe) against batch-1 latency, one labelled point per width;
    parameters against latency when no accuracy was measured."""
    plt = pyplot()
    key = next((k for k in ("knn_top1", "linear_top1") if all(e.get(k) is not None for e in entries)), None)
    ylabel = {"knn_top1": f"kNN top-1 (k={knn_k})", "linear_top1": "linear probe top-1", None: "parameters (M)"}[key]
    pts = sorted(((e["latency_ms"], e[key] if key else e["params"] / 1e6, e) for e in entries), key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.7", zorder=1)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], zorder=2)
    for x, y, e in pts:
        ax.annotate(f"w={e['width']:g}\n{e['params'] / 1e6:.2f}M, {e['macs'] / 1e6:.1f}M MACs", (x, y),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    runtime = entries[0].get("latency_runtime", "") if entries else ""
    ax.set_xlabel(f"batch-1 latency (ms, {runtime.split(' ')[0] if runtime else 'CPU'})")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
