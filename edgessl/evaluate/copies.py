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

DESC = 24  # pixels on each side of a compared window
SCALES = (0.95, 0.9, 0.85)  # crops compared besides the whole image (share of each side kept)
POSITIONS = (0.0, 0.5, 1.0)  # where a crop sits, as a share of the room it has
STEP = 0.0125  # the finer search: shifts and scale changes of this share of the image around the coarse winner
BAND = 0.2  # the band-pass neighbourhood, a share of the image's side (about 5 of the DESC pixels)
GRID = 4  # the residual of the best alignment is judged patch by patch: GRID x GRID patches
FLAT = 1e-3  # a window whose pixel spread (0..1 scale) is below this has no contrast: it scores 0


def band_pass(rows: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float: each pixel minus the mean of its neighbourhood (BAND of the image's side):
    shading and flat colour do not count, edges and texture do."""
    x = rows.float() / 255
    k = max(3, int(round(BAND * rows.shape[-1])) | 1)
    mean = F.avg_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=False)  # separable: k + k
    return x - F.avg_pool2d(mean, (1, k), stride=1, padding=(0, k // 2), count_include_pad=False)


def _crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """images (P, 3, S, S) band-passed; boxes (P, W, 4) (x1, y1, x2, y2 in pixels) -> (P, W, 3 * DESC * DESC): each
    box sampled (bilinear, one sample per output pixel) on a DESC x DESC grid and scaled to unit norm; a box
    without contrast is all zero. One grid_sample call: the W boxes are stacked along the output's height."""
    p, w, size = boxes.shape[0], boxes.shape[1], images.shape[-1]
    t = (torch.arange(DESC, dtype=torch.float32) + 0.5) / DESC  # sample positions inside a box, 0..1
    xs = boxes[..., 0:1] + t * (boxes[..., 2:3] - boxes[..., 0:1])  # (P, W, DESC)
    ys = boxes[..., 1:2] + t * (boxes[..., 3:4] - boxes[..., 1:2])
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), dim=-1)  # (P, W, D, D, 2)
    grid = grid * (2 / size) - 1
    x = F.grid_sample(images, grid.view(p, w * DESC, DESC, 2), mode="bilinear", align_corners=False)
    x = x.view(p, 3, w, DESC, DESC).permute(0, 2, 1, 3, 4).reshape(p, w, -1)
    norm = x.norm(dim=2, keepdim=True)
    return torch.where(norm < FLAT * DESC, torch.zeros_like(x), x / norm.clamp_min(1e-12))


def coarse_boxes(size: int) -> torch.Tensor:
    """(W, 4) the windows the coarse search compares: the whole image, then SCALES x POSITIONS x POSITIONS crops."""
    boxes = [(0.0, 0.0, 1.0, 1.0)]
    for s in SCALES:
        boxes += [(u * (1 - s), v * (1 - s), u * (1 - s) + s, v * (1 - s) + s) for v in POSITIONS for u in POSITIONS]
    return torch.tensor(boxes) * size


def _refine(best: torch.Tensor, size: int) -> torch.Tensor:
    """(P, 4) boxes -> (P, 27, 4): each shifted by -STEP, 0, +STEP of the image on x and y and scaled by 1 - STEP, 1,
    1 + STEP around its centre (a finer search around the coarse winner)."""
    d = torch.tensor([-STEP, 0.0, STEP]) * size
    cx, cy = (best[:, 0] + best[:, 2]) / 2, (best[:, 1] + best[:, 3]) / 2
    half = (best[:, 2] - best[:, 0]) / 2
    out = [torch.stack([cx + dx - half * k, cy + dy - half * k, cx + dx + half * k, cy + dy + half * k], dim=1)
           for dx in d for dy in d for k in (1 - STEP, 1.0, 1 + STEP)]
    return torch.stack(out, dim=1)


def prepare(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, 3, S, S) uint8 -> (band-passed images, their coarse windows (U, W, F)): what pair_scores compares."""
    images = band_pass(rows)
    return images, _crops(images, coarse_boxes(rows.shape[-1])[None].expand(len(rows), -1, -1))


def pair_scores(images: torch.Tensor, win: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Copy scores of image pairs: images, win from prepare(); pairs (P, 2) long rows of them -> (P,) (at most 1).

    A window of one image (coarse_boxes, then _refine around the best) is matched to the whole other one, both ways
    round; the best match's residual e = window - whole is cut into GRID x GRID patches and the score is
    1 - GRID^2 * max_patch |e_p|^2 / 2: the dot product as if the worst patch's residual covered the whole image.
    A copy's residual (JPEG noise, resampling) is spread over the picture and scores near its dot product; a
    different picture that matches except for one detail (another figure in a group, a flag's emblem, another
    scan of the same surface) concentrates its residual in some patch and scores lower."""
    ia, ib, at = pairs[:, 0], pairs[:, 1], torch.arange(len(pairs))
    dots = [torch.einsum("pwf,pf->pw", win[ia], win[ib, 0]), torch.einsum("pwf,pf->pw", win[ib], win[ia, 0])]
    use_ab = dots[0].max(dim=1).values >= dots[1].max(dim=1).values  # a window of a matches b better than b's of a
    src, dst = torch.where(use_ab, ia, ib), torch.where(use_ab, ib, ia)
    boxes = coarse_boxes(images.shape[-1])
    best = boxes[torch.where(use_ab, dots[0].argmax(dim=1), dots[1].argmax(dim=1))]
    fine = _crops(images[src], torch.cat([best[:, None], _refine(best, images.shape[-1])], dim=1))
    whole = win[dst, 0]
    k = torch.einsum("pwf,pf->pw", fine, whole).argmax(dim=1)
    e = (fine[at, k] - whole).view(len(pairs), 3, GRID, DESC // GRID, GRID, DESC // GRID)
    worst = e.square().sum(dim=(1, 3, 5)).flatten(1).max(dim=1).values
    flat = (win[ia, 0].abs().sum(dim=1) == 0) | (whole.abs().sum(dim=1) == 0)
    return torch.where(flat, torch.zeros_like(worst), 1 - GRID * GRID * worst / 2)


def copy_scores(get_a, pairs: np.ndarray, get_b=None, chunk: int = 1024) -> np.ndarray:
    """Copy scores of image pairs (P, 2): pairs[:, 0] index the set whose uint8 rows get_a(index (k,)) ->
    (k, 3, S, S) returns (e.g. ImageSet.get), pairs[:, 1] the set of get_b (default: the same set). In chunks of
    `chunk` pairs: memory stays bounded. -> (P,) float32."""
    out = np.zeros(len(pairs), np.float32)
    for start in range(0, len(pairs), chunk):
        part = torch.from_numpy(np.ascontiguousarray(pairs[start : start + chunk]))
        ua, ia = torch.unique(part[:, 0], return_inverse=True)
        ub, ib = torch.unique(part[:, 1], return_inverse=True)
        rows = torch.cat([get_a(ua), (get_b or get_a)(ub)])  # each image prepared once per chunk
        images, win = prepare(rows)
        out[start : start + len(part)] = pair_scores(images, win, torch.stack([ia, ib + len(ua)], 1)).numpy()
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
    planted copies, precision at PREVALENCE (see estimate), how many planted copies, the folder's own pairs above
    the threshold (real copies and any look-alikes), and whether the target precision was reached."""

    threshold: float
    precision: float
    recall: float
    planted: int
    folder_pairs: int
    target: float
    reached: bool
    chosen: str  # "auto" or "given"


PREVALENCE = 0.03  # the share of a folder's images assumed to be copies when precision is estimated


def estimate(t: float, true: np.ndarray, wrong: np.ndarray, own: np.ndarray) -> tuple[float, float, int]:
    """(precision, recall, own pairs) of threshold t. true (M,): each planted copy's score with its original (-inf:
    not among its candidates); wrong (Q,): the planted copies' scores with the other images they were compared with
    (their original's look-alikes: certainly not copies); own (R,): the folder's own candidate pairs (real copies
    and look-alikes mixed: counted, never used in the estimate).

    Each image's neighbours are compared as a planted copy's are, so a wrong pair per planted copy estimates the
    false pairs per image. Precision is that of a folder where PREVALENCE of the images have a copy found at this
    recall: PREVALENCE r / (PREVALENCE r + wrong(t) / M). It does not depend on the folder's size."""
    m = max(len(true), 1)
    recall = float((np.isfinite(true) & (true >= t)).sum()) / m
    hits, false = PREVALENCE * recall, float((wrong >= t).sum()) / m
    precision = hits / (hits + false) if hits + false > 0 else 1.0
    return precision, recall, int((own >= t).sum())


def choose_rule(true: np.ndarray, wrong: np.ndarray, own: np.ndarray, target: float = 0.95) -> Rule:
    """The lowest threshold (the highest recall) whose estimated precision reaches `target`; when none does, the
    threshold of the best precision. Candidates: every score observed, and 1.0."""
    values = np.concatenate([true, wrong, own, [1.0]]).astype(np.float64)
    candidates = np.unique(values[np.isfinite(values)])
    own = own[np.isfinite(own)]
    best = None
    for t in candidates:  # ascending: the first that reaches the target has the highest recall
        p, r, k = estimate(float(t), true, wrong, own)
        if p >= target and r > 0:
            return Rule(float(t), p, r, len(true), k, target, True, "auto")
        if best is None or p > best.precision:
            best = Rule(float(t), p, r, len(true), k, target, False, "auto")
    return best


def rule_at(threshold: float, true: np.ndarray, wrong: np.ndarray, own: np.ndarray, target: float = 0.95) -> Rule:
    """The estimates of a threshold the user gave."""
    p, r, k = estimate(float(threshold), true, wrong, own[np.isfinite(own)])
    return Rule(float(threshold), p, r, len(true), k, target, p >= target, "given")
