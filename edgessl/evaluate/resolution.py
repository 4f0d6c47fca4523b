"""A pair's two images compared at the coarser one's resolution (a pure function the copy score applies per pair).

Rows are decoded with the shorter side resized to S pixels, so a file stored with a shorter side s < S is an
upsampled, blurred row: a copy shrunk to half of a 32 px picture (16 px, the copy model's smallest resize) lacks the
detail its sharp original shows in the copy score's DESC x DESC windows, and its score against the original fell as
low as 0.2. Resampling the sharper image through the coarser one's size first, as the copy itself went, gives them
the same detail; edgessl.evaluate.copies.copy_scores keeps the better of that score and the one as decoded (bicubic
down and up again is no exact model of how each copy was made, and some copies score higher as decoded). Measured
by the copy-score suite (benchmarks/copy_score.py, 400 copies planted with seed 11): copies under 0.7 went 28 -> 14
on 2,000 CIFAR-10 images and 22 -> 8 on 5,000, while the folders' look-alike pairs (files of one size) are left as
they were. Only pairs whose coarser image is below FINE pixels are matched: larger ones already hold every detail
the DESC-pixel window shows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FINE = 27  # a file whose shorter side reaches this holds every detail a DESC (24) pixel window of ~0.9 of it shows
SHRUNK = 0.87  # pairs are matched when the coarser image's side is below this share of the sharper one's
MATCH_FLOOR = 0.0  # only pairs scoring this or more as decoded are scored again: of 400 planted CIFAR-10 copies the
# lowest scored 0.23 as decoded, while 1,198 of the 1,200 pairs of those copies with other photos scored below 0, so
# the calibration (which fits every candidate pair) costs about what it did


def match_resolution(rows: torch.Tensor, pairs: torch.Tensor, sides: torch.Tensor) -> tuple[torch.Tensor,
                                                                                            torch.Tensor, torch.Tensor]:
    """rows (U, 3, S, S) uint8, pairs (P, 2) long rows of them, sides (U,) long: each row's file's shorter side
    as stored -> (rows (U + Q, 3, S, S): the input rows and one new row for each of the Q pairs that needs it,
    matched (Q, 2): those pairs with the new row in place of their sharper image, which (Q,): their places in pairs).

    A row's resolution is r = min(side, S). In a pair with min(r_a, r_b) < FINE and below SHRUNK x max(r_a, r_b),
    the sharper image is resampled to the coarser one's r x r pixels and back to S x S (bicubic, antialiased), the
    way the decoder enlarged the smaller file; every input row is left as it is."""
    size = rows.shape[-1]
    r = sides.clamp(max=size)
    ra, rb = r[pairs[:, 0]], r[pairs[:, 1]]
    low, high = torch.minimum(ra, rb), torch.maximum(ra, rb)
    which = torch.nonzero((low < FINE) & (low < SHRUNK * high)).squeeze(1)
    if not len(which):
        return rows, pairs[:0], which
    sharper = (rb[which] > ra[which]).long()  # 1: the pair's second image is the sharper one
    source = pairs[which, sharper]
    fresh = torch.empty(len(which), *rows.shape[1:], dtype=torch.uint8)
    for target in low[which].unique().tolist():
        pick = low[which] == target
        x = F.interpolate(rows[source[pick]].float(), size=(target, target), mode="bicubic", antialias=True)
        x = F.interpolate(x, size=(size, size), mode="bicubic")
        fresh[pick] = x.round().clamp(0, 255).to(torch.uint8)
    matched = pairs[which].clone()
    matched[torch.arange(len(which)), sharper] = len(rows) + torch.arange(len(which))
    return torch.cat([rows, fresh]), matched, which


def row_sides(ua: torch.Tensor, ub: torch.Tensor, sides_a, sides_b):
    """rows -> their files' shorter sides, for a chunk whose rows are set a's images ua, then set b's ub
    (sides_a / sides_b: image index -> shorter side): only the rows asked for are looked up."""

    def sides(rows: torch.Tensor) -> torch.Tensor:
        first = rows < len(ua)
        out = torch.empty(len(rows), dtype=torch.long)
        out[first] = sides_a(ua[rows[first]])
        out[~first] = sides_b(ub[rows[~first] - len(ua)])
        return out

    return sides
