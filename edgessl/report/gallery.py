"""neighbours.png of `edgessl embed --neighbours K`: query images in rows, each beside its K nearest images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgessl.report.plots import fit_title, pyplot


def plot_neighbour_gallery(queries: Sequence[np.ndarray], neighbours: Sequence[Sequence[np.ndarray]],
                           cosines: np.ndarray, names: Sequence[str], path: str | Path, title: str = "",
                           neighbour_names: Sequence[Sequence[str]] | None = None, space: str = "cosine") -> None:
    """One row per query: the query (framed, its file name below) then its neighbours, nearest first, each titled
    with its cosine to the query (`space` names it in the title, e.g. "whitened cosine, 128 directions") and its
    file name below.

    queries: R images (H, W, 3) uint8; neighbours: R lists of K images; cosines: (R, K); names: R file names;
    neighbour_names: R lists of K file names."""
    plt = pyplot()
    rows, k = len(queries), max(len(n) for n in neighbours)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.3 * (k + 1), 1.45 * rows + 0.5), squeeze=False)
    for r in range(rows):
        _tile(axes[r, 0], queries[r], short_name(names[r]), "query" if r == 0 else "", frame="tab:blue")
        for j in range(k):
            if j < len(neighbours[r]):
                below = short_name(neighbour_names[r][j]) if neighbour_names is not None else ""
                _tile(axes[r, j + 1], neighbours[r][j], below, f"{float(cosines[r][j]):.3f}")
            else:
                axes[r, j + 1].axis("off")
    fit_title(fig, title or f"nearest neighbours ({space}), {rows} queries x {k}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def short_name(name: str, width: int = 18) -> str:
    """A file name cut to `width` characters in the middle, its end (number, extension) kept: 'pitted_su…_143.jpg'
    ('pitted_surface_143' had looked like a whole, other name)."""
    if len(name) <= width:
        return name
    tail = width // 2
    return f"{name[:width - tail - 1]}…{name[-tail:]}"


def _tile(ax, image: np.ndarray, below: str, above: str, frame: str | None = None) -> None:
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    if above:
        ax.set_title(above, fontsize=8, pad=2)
    if below:
        ax.set_xlabel(below, fontsize=6, labelpad=2)
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_edgecolor(frame)
            spine.set_linewidth(2.5)
