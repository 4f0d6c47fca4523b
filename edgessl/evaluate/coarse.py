"""The coarse prefilter's product (pure functions; edgessl.evaluate.copies prepares the windows and calls them):
coarse_between defines it, best_window_ncc computes each direction of it without gathering each pair's windows.

A pair's coarse score needs every coarse window of one image against the whole window of the other: W x F floats
of one side and F of the other. Gathering both sides' (W, F) windows for every pair moved about 387 KB a pair (W =
28 windows of F = 1,728 floats) and cost more than the product itself (50,000 CIFAR-10 images, about 300,000 pairs:
about 60 of the search's 153 s). Here each image's windows are read once per group of its pairs: the pairs are
grouped by the image whose windows are scanned, the partners' whole windows (F floats each) are gathered into a
padded (G, k, F) batch, and one batched product gives (G, W, k).
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_FLOATS = 1 << 23  # the padded partner batch holds at most this many floats (32 MiB) at a time


def best_window_ncc(win: torch.Tensor, rows: np.ndarray, whole: torch.Tensor, partners: np.ndarray) -> torch.Tensor:
    """win (N, W, F) unit windows of one set, whole (M, F) unit whole windows of the other; pairs (rows[p],
    partners[p]), P of them -> (P,) max over w of win[rows[p], w] . whole[partners[p]].

    The same values as (win[rows] @ whole[partners, :, None]).max over w, up to the order of the float sums."""
    out = torch.empty(len(rows), dtype=win.dtype)
    if not len(rows):
        return out
    order = np.argsort(rows, kind="stable")
    groups, start, counts = np.unique(rows[order], return_index=True, return_counts=True)
    by_size = np.argsort(counts, kind="stable")  # groups of like size share a padded batch
    f = whole.shape[1]
    lo = 0
    while lo < len(by_size):
        k = int(counts[by_size[lo]])
        hi = lo + 1
        while hi < len(by_size) and (hi - lo + 1) * int(counts[by_size[hi]]) * f <= GROUP_FLOATS:
            k = int(counts[by_size[hi]])
            hi += 1
        part = by_size[lo:hi]
        sizes = counts[part]
        group = np.repeat(np.arange(len(part)), sizes)
        slot = np.arange(len(group)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        members = order[np.repeat(start[part], sizes) + slot]
        batch = whole.new_zeros(len(part), k, f)
        batch[torch.from_numpy(group), torch.from_numpy(slot)] = whole[torch.from_numpy(partners[members])]
        best = torch.bmm(win[torch.from_numpy(groups[part])], batch.transpose(1, 2)).max(dim=1).values  # (g, k)
        out[torch.from_numpy(members)] = best[torch.from_numpy(group), torch.from_numpy(slot)]
        lo = hi
    return out


def coarse_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (P, W, F) the unit coarse windows of each pair's two images -> (P,) coarse score (the definition;
    copies.coarse_of computes it with best_window_ncc, each direction in turn)."""
    return torch.maximum(torch.einsum("pwf,pf->pw", a, b[:, 0]).max(dim=1).values,
                         torch.einsum("pwf,pf->pw", b, a[:, 0]).max(dim=1).values)
