"""Copies of one picture among a folder's images: the pixel-level score of a pair, exact twins, and the decision rule
chosen on synthetic copies (pure functions; edgessl.workflows.embed wires them).

The copy score of two images a, b: every window of a (the whole image, and crops keeping SCALES of each side at 3 x 3
positions) is resized to DESC x DESC pixels, each colour channel's mean is removed and the window scaled to unit
norm; the score is the largest dot product of a window of a with the whole of b, or of a window of b with the whole
of a (a normalised cross-correlation). A crop, a resize, a brightness or contrast change and JPEG noise leave it
near 1; another picture, even a similar one, scores lower. Flat windows (no contrast) score 0.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

DESC = 24  # pixels on each side of a compared window
SCALES = (0.95, 0.9, 0.85)  # crops compared besides the whole image (share of each side kept)
POSITIONS = (0.0, 0.5, 1.0)  # where a crop sits, as a share of the room it has
STEP = 0.0125  # the finer search: shifts and scale changes of this share of the image around the coarse winner
BAND = 5  # each pixel minus the mean of its BAND x BAND neighbourhood: shading and flat colour do not count
GRID = 4  # the residual of the best alignment is judged patch by patch: GRID x GRID patches
FLAT = 1e-3  # a window whose pixel spread (0..1 scale) is below this has no contrast: it scores 0


def _crops(images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """images (B, 3, S, S) float in 0..1; rois (K, 5) (image row, x1, y1, x2, y2 in pixels) -> (K, 3 * DESC * DESC):
    each box resized to DESC x DESC, band-passed (each pixel minus its BAND x BAND mean: shading and flat colour
    do not count) and scaled to unit norm; a box without contrast is all zero."""
    x = roi_align(images, rois, (DESC, DESC), sampling_ratio=2, aligned=True)
    x = (x - F.avg_pool2d(x, BAND, stride=1, padding=BAND // 2, count_include_pad=False)).flatten(1)
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm < FLAT * DESC, torch.zeros_like(x), x / norm.clamp_min(1e-12))


def coarse_boxes(size: int) -> torch.Tensor:
    """(W, 4) the windows the coarse search compares: the whole image, then SCALES x POSITIONS x POSITIONS crops."""
    boxes = [(0.0, 0.0, 1.0, 1.0)]
    for s in SCALES:
        boxes += [(u * (1 - s), v * (1 - s), u * (1 - s) + s, v * (1 - s) + s) for v in POSITIONS for u in POSITIONS]
    return torch.tensor(boxes) * size


def _rois(row: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(P,) image rows and (P, K, 4) boxes -> (P * K, 5) rois."""
    return torch.cat([row[:, None, None].expand(-1, boxes.shape[1], 1).float(), boxes], dim=2).view(-1, 5)


def _refine(best: torch.Tensor, size: int) -> torch.Tensor:
    """(P, 4) boxes -> (P, 27, 4): each shifted by -STEP, 0, +STEP of the image on x and y and scaled by 1 - STEP, 1,
    1 + STEP around its centre (a finer search around the coarse winner)."""
    d = torch.tensor([-STEP, 0.0, STEP]) * size
    cx, cy = (best[:, 0] + best[:, 2]) / 2, (best[:, 1] + best[:, 3]) / 2
    half = (best[:, 2] - best[:, 0]) / 2
    out = [torch.stack([cx + dx - half * k, cy + dy - half * k, cx + dx + half * k, cy + dy + half * k], dim=1)
           for dx in d for dy in d for k in (1 - STEP, 1.0, 1 + STEP)]
    return torch.stack(out, dim=1)


def pair_scores(rows_a: torch.Tensor, rows_b: torch.Tensor) -> torch.Tensor:
    """Copy scores of image pairs: rows_a, rows_b (P, 3, S, S) uint8 -> (P,) (at most 1).

    A window of one image (coarse_boxes, then _refine around the best) is matched to the whole other one, both ways
    round; the best match's residual e = window - whole is cut into GRID x GRID patches and the score is
    1 - GRID^2 * max_patch |e_p|^2 / 2: the dot product as if the worst patch's residual covered the whole image.
    A copy's residual (JPEG noise, resampling) is spread over the picture and scores near its dot product; a
    different picture that matches except for one detail (another figure in a group, a flag's emblem, another
    scan of the same surface) concentrates its residual in some patch and scores lower."""
    p, size = rows_a.shape[0], rows_a.shape[-1]
    images = torch.cat([rows_a, rows_b]).float() / 255
    ia, ib = torch.arange(p), torch.arange(p, 2 * p)
    boxes = coarse_boxes(size)[None].expand(p, -1, -1)
    whole_a, whole_b = _crops(images, _rois(ia, boxes[:, :1])), _crops(images, _rois(ib, boxes[:, :1]))
    scores, picked = [], []
    for src, whole in ((ia, whole_b), (ib, whole_a)):  # windows of a against b, then of b against a
        win = _crops(images, _rois(src, boxes)).view(p, boxes.shape[1], -1)
        best = torch.einsum("pwf,pf->pw", win, whole).argmax(dim=1)
        fine = torch.cat([boxes[torch.arange(p), best][:, None], _refine(boxes[torch.arange(p), best], size)], 1)
        win = _crops(images, _rois(src, fine)).view(p, fine.shape[1], -1)
        dots = torch.einsum("pwf,pf->pw", win, whole)
        k = dots.argmax(dim=1)
        scores.append(dots[torch.arange(p), k])
        picked.append(win[torch.arange(p), k] - whole)
    use_ab = scores[0] >= scores[1]
    e = torch.where(use_ab[:, None], picked[0], picked[1]).view(p, 3, GRID, DESC // GRID, GRID, DESC // GRID)
    worst = e.square().sum(dim=(1, 3, 5)).flatten(1).max(dim=1).values
    flat = (whole_a.abs().sum(dim=1) == 0) | (whole_b.abs().sum(dim=1) == 0)
    return torch.where(flat, torch.zeros_like(worst), 1 - GRID * GRID * worst / 2)


def copy_scores(get_a, pairs: np.ndarray, get_b=None, chunk: int = 256) -> np.ndarray:
    """Copy scores of image pairs (P, 2): pairs[:, 0] index the set whose uint8 rows get_a(index (k,)) ->
    (k, 3, S, S) returns (e.g. ImageSet.get), pairs[:, 1] the set of get_b (default: the same set). In chunks of
    `chunk` pairs: memory stays bounded. -> (P,) float32."""
    get_b = get_b or get_a
    out = np.zeros(len(pairs), np.float32)
    for start in range(0, len(pairs), chunk):
        part = torch.from_numpy(np.ascontiguousarray(pairs[start : start + chunk]))
        out[start : start + len(part)] = pair_scores(get_a(part[:, 0]), get_b(part[:, 1])).numpy()
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


# ---------------------------------------------------------------- the rule, chosen on planted copies
@dataclass
class Rule:
    """A pair is a copy when its copy score >= threshold. The estimates come from the calibration: recall over the
    planted copies, precision at PREVALENCE (see choose_rule), how many planted copies, the folder's own pairs
    above the threshold, and whether the target precision was reached."""

    threshold: float
    precision: float
    recall: float
    planted: int
    folder_pairs: int
    target: float
    reached: bool
    chosen: str  # "auto" or "given"


PREVALENCE = 0.03  # the share of a folder's images assumed to be copies when precision is estimated


def estimate(t: float, true: np.ndarray, wrong: np.ndarray, own: np.ndarray, n: int) -> tuple[float, float, int]:
    """(precision, recall, own pairs) of threshold t. true (M,): each planted copy's score with its original (-inf:
    not among its candidates); wrong (Q,): the planted copies' scores with other images; own (R,): the folder's
    own candidate pairs (counted as false: copies already in the folder only make the estimate cautious); n: the
    folder's images. Precision is that of a folder where PREVALENCE * n images are copies found at this recall,
    with the planted copies' wrong pairs scaled to that many copies and the folder's own pairs as they are."""
    m = max(len(true), 1)
    recall = float((true >= t).sum()) / m
    expected = PREVALENCE * n
    hits = expected * recall
    false = expected * float((wrong >= t).sum()) / m + float((own >= t).sum())
    precision = hits / (hits + false) if hits + false > 0 else 1.0
    return precision, recall, int((own >= t).sum())


def choose_rule(true: np.ndarray, wrong: np.ndarray, own: np.ndarray, n: int, target: float = 0.95) -> Rule:
    """The lowest threshold (the highest recall) whose estimated precision reaches `target`; when none does, the
    threshold of the best precision. Candidates: every score observed, and 1.0."""
    candidates = np.unique(np.concatenate([true[np.isfinite(true)], wrong, own, [1.0]]).astype(np.float64))
    best = None
    for t in candidates:  # ascending: the first that reaches the target has the highest recall
        p, r, k = estimate(float(t), true, wrong, own, n)
        if p >= target and r > 0:
            return Rule(float(t), p, r, len(true), k, target, True, "auto")
        if best is None or p > best.precision:
            best = Rule(float(t), p, r, len(true), k, target, False, "auto")
    return best


def rule_at(threshold: float, true: np.ndarray, wrong: np.ndarray, own: np.ndarray, n: int,
            target: float = 0.95) -> Rule:
    """The estimates of a threshold the user gave."""
    p, r, k = estimate(float(threshold), true, wrong, own, n)
    return Rule(float(threshold), p, r, len(true), k, target, p >= target, "given")
