"""eval.png (accuracy vs labels per class) and confusion.png (fine-tuned classifier on the test set)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgessl.report.plots import fit_title, pyplot

_PANELS = (("knn", 20, "kNN (k=20)"), ("knn", 200, "kNN (k=200)"), ("linear", None, "linear probe"))
_STYLE = {"pretrained": dict(color="tab:blue", marker="o"), "random": dict(color="tab:gray", marker="s", ls="--")}


def plot_eval(summary: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """One panel per protocol: top-1 (mean ± std over seeds) against labels per class, one line per encoder.

    summary: rows of evaluate.protocol.summarize. The x axis is categorical (1, 5, 10, ..., all)."""
    plt = pyplot()
    lpcs = list(dict.fromkeys(s["labels_per_class"] for s in summary))
    pos = {v: i for i, v in enumerate(lpcs)}
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4.2 * len(_PANELS), 3.6), sharey=True, squeeze=False)
    for ax, (proto, k, label) in zip(axes[0], _PANELS, strict=True):
        for enc in ("pretrained", "random"):
            rows = [s for s in summary if s["encoder"] == enc and s["protocol"] == proto and s["k"] == k]
            if not rows:
                continue
            x = [pos[s["labels_per_class"]] for s in rows]
            y = [100 * s["top1_mean"] for s in rows]
            err = [100 * s["top1_std"] for s in rows]
            ax.errorbar(x, y, yerr=err, capsize=3, label=enc if enc == "pretrained" else "random init", **_STYLE[enc])
        ax.set_xticks(range(len(lpcs)), [str(v) for v in lpcs])
        ax.set_xlabel("labels per class")
        ax.set_title(panel_title(summary, proto, k, label), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test top-1 (%)")
    axes[0, 0].legend()
    if title:
        fit_title(fig, title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def panel_title(summary: Sequence[dict[str, Any]], proto: str, k: int | None, label: str) -> str:
    """A kNN panel's title says the budgets with at most k labelled images (every one of them votes there: the
    k=20 and k=200 panels had looked alike under the same 'k=200')."""
    if proto != "knn":
        return label
    fewer = list(dict.fromkeys(s["labels_per_class"] for s in summary
                               if s["protocol"] == proto and s["k"] == k and s["n_train"] <= k))
    return label if not fewer else f"{label}\nall labelled images vote at {', '.join(map(str, fewer))}/class"


def plot_confusion(cm, classes: Sequence[str], path: str | Path, title: str = "") -> None:
    """confusion.png: confusion_figure, saved."""
    fig = confusion_figure(cm, classes, title)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def confusion_figure(cm, classes: Sequence[str], title: str = ""):
    """Row-normalised confusion matrix (true class per row) with the raw counts written in each cell; the title
    shrinks to the figure's width (a long run name had cut off the test top-1).

    cm: (C, C) counts (tensor, array or nested lists)."""
    plt = pyplot()
    cm = np.asarray(cm.tolist() if hasattr(cm, "tolist") else cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(classes)
    side = max(4.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if title:
        fit_title(fig, title)
    fig.tight_layout()
    return fig
