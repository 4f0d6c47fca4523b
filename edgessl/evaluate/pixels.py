"""The folder's pixel signals beside the copy score (edgessl.evaluate.copies): exact twins (a hash of the decoded
pixels) and the small thumbnails that propose candidate pairs (pure functions over a row getter)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

THUMB = 8  # the pixel thumbnail that proposes candidate pairs: THUMB x THUMB, 3 colours


def thumbnails(get_rows, n: int, chunk: int = 1024) -> np.ndarray:
    """(n, 3 * THUMB * THUMB) float32 unit rows: each image (rows 0..n-1 of get_rows) area-averaged to THUMB x THUMB,
    each colour's mean removed. A copy's thumbnail stays close to its original's (a 10 % crop moves it by less than
    a thumbnail pixel; brightness and contrast are normalised away); a flat image's row is zero."""
    out = np.zeros((n, 3 * THUMB * THUMB), np.float32)
    for start in range(0, n, chunk):
        rows = get_rows(torch.arange(start, min(n, start + chunk))).float()
        x = F.adaptive_avg_pool2d(rows, THUMB)
        x = (x - x.mean(dim=(2, 3), keepdim=True)).flatten(1)
        norm = x.norm(dim=1, keepdim=True)
        out[start : start + len(x)] = torch.where(norm < 1e-3, torch.zeros_like(x), x / norm.clamp_min(1e-12)).numpy()
    return out


def pixel_hashes(get_rows, n: int, chunk: int = 1024) -> list[str]:
    """sha1 of every image's decoded uint8 pixels (rows 0..n-1 of get_rows): equal hashes, the same pixels."""
    out = []
    for start in range(0, n, chunk):
        rows = get_rows(torch.arange(start, min(n, start + chunk))).numpy()
        out += [hashlib.sha1(r.tobytes()).hexdigest() for r in rows]
    return out


def exact_pairs(hashes: list[str]) -> np.ndarray:
    """(P, 2) pairs (i < j) chaining every group of equal hashes (i with each later member): enough to group them."""
    first: dict[str, int] = {}
    pairs = []
    for j, h in enumerate(hashes):
        if h in first:
            pairs.append((first[h], j))
        else:
            first[h] = j
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)
