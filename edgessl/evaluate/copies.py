"""Copies of one picture among a folder's images: the pixel-level score of a pair, exact twins, and the decision rule
chosen on synthetic copies (pure functions; edgessl.workflows.embed wires them).

The copy score of two images a, b: both are smoothed and compared on a DESC x DESC grid, each window band-passed
after the alignment (shading and flat colour removed, the same content on both sides). A box in a (centre and
half-sizes, so a crop that kept more of the width than of the height is found too) is fitted by gradient ascent on
its normalised cross-correlation (NCC) with the whole of b, from the whole image and from the best of a coarse set
of square crops, in both directions (a box in b against the whole of a); the better fit is judged by its worst
patch (pair_scores). A crop, a resize, a brightness or contrast change and JPEG noise leave it near 1; another
picture, even a similar one, scores lower. Flat images score 0.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DESC = 24  # pixels on each side of a compared window
SCALES = (0.95, 0.9, 0.85)  # the coarse search's square crops (share of each side kept)
POSITIONS = (0.0, 0.5, 1.0)  # where a coarse crop sits, as a share of the room it has
STEPS = 15  # gradient steps of the box fit (Adam)
LR = 0.015  # Adam's step, in units of the half image (the box moves at most STEPS * LR = 0.225 of it)
BAND = 0.2  # the band-pass neighbourhood, a share of the window's side (5 of the DESC pixels)
GRID = 8  # the residual of the best alignment is judged patch by patch: GRID x GRID patches (3 x 3 pixels)
SMOOTH = 0.5  # the Gaussian blur before comparing, in comparison pixels (sigma)
FLAT = 1e-3  # a window whose pixel spread (0..1 scale) is below this has no contrast: it scores 0


def band_pass(x: torch.Tensor) -> torch.Tensor:
    """(P, C, D, D) aligned windows (0..1) -> the same, each pixel minus the mean of its neighbourhood (BAND of the
    window's side, clipped at the window's edge): shading and flat colour do not count, edges and texture do. Applied
    after the alignment, so both windows of a pair see the same content up to the same edges (a band-pass of the
    whole image would differ along a crop's new border)."""
    k = max(3, int(round(BAND * x.shape[-1])) | 1)
    mean = F.avg_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=False)  # separable: k + k
    return x - F.avg_pool2d(mean, (1, k), stride=1, padding=(0, k // 2), count_include_pad=False)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) -> the same, blurred by a Gaussian of sigma S / (2 DESC) pixels (half a comparison pixel): the
    DESC x DESC samples then do not alias, and the fit's NCC changes smoothly with the box."""
    sigma = SMOOTH * x.shape[-1] / DESC
    rad = int(3 * sigma) + 1
    g = torch.exp(-torch.arange(-rad, rad + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
    g = (g / g.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (rad, rad, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, rad, rad), mode="replicate"), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def sample(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """images (P, C, S, S); boxes (P, 4) = (cx, cy, hx, hy) in grid_sample's coordinates (the whole image is
    (0, 0, 1, 1)) -> (P, C, DESC, DESC): each box sampled bilinearly at DESC x DESC cell centres (border padding)."""
    t = (torch.arange(DESC, dtype=images.dtype) + 0.5) / DESC * 2 - 1
    xs = boxes[:, 0:1] + boxes[:, 2:3] * t  # (P, DESC)
    ys = boxes[:, 1:2] + boxes[:, 3:4] * t
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (P, DESC, DESC, 2)
    return F.grid_sample(images, grid, mode="bilinear", align_corners=False, padding_mode="border")


def unit(x: torch.Tensor) -> torch.Tensor:
    """(P, C, D, D) aligned windows -> band-passed, each channel's mean removed, each window scaled to unit norm (a
    flat window stays 0): what the NCC compares."""
    x = band_pass(x)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    norm = x.flatten(1).norm(dim=1)[:, None, None, None]
    return torch.where(norm < FLAT * DESC, torch.zeros_like(x), x / norm.clamp_min(1e-12))


WHOLE = (0.0, 0.0, 1.0, 1.0)


def coarse_boxes() -> torch.Tensor:
    """(W, 4) the coarse search's boxes (cx, cy, hx, hy): the whole image, then SCALES x POSITIONS x POSITIONS
    square crops."""
    boxes = [WHOLE]
    for s in SCALES:
        boxes += [((2 * u - 1) * (1 - s), (2 * v - 1) * (1 - s), s, s) for v in POSITIONS for u in POSITIONS]
    return torch.tensor(boxes)


def prepare(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, 3, S, S) uint8 -> (smoothed images in 0..1 (U, 3, S, S), their unit coarse windows (U, W, F)): what
    pair_scores compares."""
    images = smooth(rows.float() / 255)
    boxes = coarse_boxes()
    n, w = len(rows), len(boxes)
    win = unit(sample(images.repeat_interleave(w, 0), boxes.repeat(n, 1)))
    return images, win.view(n, w, -1)


def fit_box(src: torch.Tensor, whole: torch.Tensor, inits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """src (P, 3, S, S) images, whole (P, 3, DESC, DESC) unit windows of the other images, inits: (P, 4) candidate
    boxes -> (the best boxes (P, 4), their NCC (P,)): from the init with the highest NCC, STEPS Adam steps raise
    sum(unit(sample(src, box)) * whole); the box with the highest NCC seen on the way (the init included) wins."""
    with torch.inference_mode(False), torch.enable_grad():
        src, whole = src.clone(), whole.clone()
        with torch.no_grad():
            start = torch.stack([(unit(sample(src, b)) * whole).flatten(1).sum(1) for b in inits], 1).argmax(1)
        box = torch.stack(inits, 1)[torch.arange(len(src)), start].clone().requires_grad_(True)
        best_box, best = box.detach().clone(), torch.full((len(src),), -2.0)
        opt = torch.optim.Adam([box], lr=LR)
        for step in range(STEPS + 1):
            ncc = (unit(sample(src, box)) * whole).flatten(1).sum(1)
            better = ncc.detach() > best
            best_box = torch.where(better[:, None], box.detach(), best_box)
            best = torch.where(better, ncc.detach(), best)
            if step < STEPS:
                opt.zero_grad()
                (-ncc.sum()).backward()
                opt.step()
    return best_box, best


def pair_scores(images: torch.Tensor, win: torch.Tensor, pairs: torch.Tensor, colour: bool = True) -> torch.Tensor:
    """Copy scores of image pairs: images, win from prepare(); pairs (P, 2) long rows of them -> (P,) (at most 1).

    In each direction (a box in a against the whole b, and a box in b against the whole a) the box is fitted
    (fit_box) from the whole image and from the best coarse window; the direction with the higher NCC wins. Its
    residual e = unit(box) - whole is cut into GRID x GRID patches and the score is 1 - GRID^2 * max_patch |e_p|^2 / 2:
    the NCC as if the worst patch's residual covered the whole image. A copy's residual (JPEG noise, resampling) is
    spread over the picture and scores near its NCC; a different picture that matches except for one detail (another
    figure in a group, a flag's emblem, another scan of the same surface) concentrates its residual in some patch.
    colour: the score is at most the same worst-patch score of the colours in the same box (the smoothed windows
    before the band-pass), brightness and contrast removed (unit_joint): a skin-tone or colour variant has the same
    edges but not the same colours."""
    p = len(pairs)
    boxes = coarse_boxes()
    fits = []
    for src, dst in ((pairs[:, 0], pairs[:, 1]), (pairs[:, 1], pairs[:, 0])):
        whole = win[dst, 0].view(p, 3, DESC, DESC)
        coarse = boxes[window_ncc(win, src, dst).argmax(dim=1)]
        fits.append((src, whole, *fit_box(images[src], whole, [torch.tensor(WHOLE).expand(p, 4), coarse])))
    use_ab = fits[0][3] >= fits[1][3]
    src = torch.where(use_ab, fits[0][0], fits[1][0])
    dst = torch.where(use_ab, pairs[:, 1], pairs[:, 0])
    whole = torch.where(use_ab[:, None, None, None], fits[0][1], fits[1][1])
    box = torch.where(use_ab[:, None], fits[0][2], fits[1][2])
    a = sample(images[src], box)
    score = worst_patch(unit(a), whole)
    if colour:  # the same box on the colours themselves: a recoloured look-alike differs there
        b = sample(images[dst], torch.tensor(WHOLE).expand(p, 4))
        score = torch.minimum(score, worst_patch(unit_joint(a), unit_joint(b)))
        score = torch.minimum(score, 1 - CHROMA_SLOPE * chroma_shift(a, b))
    flat = (win[pairs[:, 0], 0].abs().sum(dim=1) == 0) | (win[pairs[:, 1], 0].abs().sum(dim=1) == 0)
    return torch.where(flat, torch.zeros_like(score), score)


def worst_patch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (P, 3, DESC, DESC) unit windows -> (P,) 1 - GRID^2 * max_patch |a_p - b_p|^2 / 2: their dot product as
    if the worst of the GRID x GRID patches' residual covered the whole window."""
    e = (a - b).view(len(a), 3, GRID, DESC // GRID, GRID, DESC // GRID)
    return 1 - GRID * GRID * e.square().sum(dim=(1, 3, 5)).flatten(1).max(dim=1).values / 2


CHROMA_SLOPE = 2.0  # the score is at most 1 - CHROMA_SLOPE x chroma_shift: 0.1 -> 0.8, 0.2 -> 0.6
GAIN = (0.75, 1.33)  # the brightness gains chroma_shift allows: the copy model's (0.9 x 0.9 to 1.1 x 1.1) and more


def chroma_shift(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (P, 3, D, D) colours in 0..1 -> (P,) the largest change of colour among GRID x GRID patches: each patch's
    mean colour differences (R - G, (R + G) / 2 - B) of b against a's times the brightness gain g that best maps
    a's brightness onto b's (least squares, within GAIN; 1 for a flat a). A brightness or contrast change (b = g
    a + o on every channel) gives 0; a hue change of an area (an orange square that became yellow, another flag's
    colours) gives its shift (orange 255,152,0 -> yellow 255,204,50 over a patch: 0.22). Measured on 500
    planted copies per folder (JPEG, crop, resize, brightness, contrast; 8 x 8 patches): at most 0.20 on emoji,
    0.22 on CIFAR-10 (a cap of 0.56, above its threshold), 0 on greyscale scans."""
    la, lb = a.mean(dim=1), b.mean(dim=1)
    la, lb = la - la.mean(dim=(1, 2), keepdim=True), lb - lb.mean(dim=(1, 2), keepdim=True)
    energy = la.square().sum(dim=(1, 2))
    g = torch.where(energy > FLAT, (la * lb).sum(dim=(1, 2)) / energy.clamp_min(1e-12), torch.ones_like(energy))

    def chroma(x: torch.Tensor) -> torch.Tensor:
        r, gr, bl = x.unbind(dim=1)
        return torch.stack([r - gr, (r + gr) / 2 - bl], dim=1)

    d = chroma(b) - g.clamp(*GAIN)[:, None, None, None] * chroma(a)
    p, _, n, _ = d.shape
    patches = d.view(p, 2, GRID, n // GRID, GRID, n // GRID).mean(dim=(3, 5))
    return patches.norm(dim=1).flatten(1).max(dim=1).values


def unit_joint(x: torch.Tensor) -> torch.Tensor:
    """(P, 3, D, D) colours -> one mean over all channels removed, unit norm: a brightness or contrast change (the
    same gain and offset on every channel) cancels, a change of hue or of one colour does not (a flat window: 0)."""
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    norm = x.flatten(1).norm(dim=1)[:, None, None, None]
    return torch.where(norm < FLAT * DESC, torch.zeros_like(x), x / norm.clamp_min(1e-12))


COARSE_MARGIN = 0.3  # the prefilter's gate: this far below the coarse NCC of 99 % of the planted copies


def window_ncc(win: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """win from prepare(); src, dst (P,) rows -> (P, W) the NCC of each coarse window of src with the whole of dst."""
    return torch.einsum("pwf,pf->pw", win[src], win[dst, 0])


def coarse_scores(win: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """win from prepare(); pairs (P, 2) -> (P,) the best NCC of a coarse window of either image with the whole of
    the other: what the box fit starts from, at the cost of one small matrix product."""
    return torch.maximum(window_ncc(win, pairs[:, 0], pairs[:, 1]).max(dim=1).values,
                         window_ncc(win, pairs[:, 1], pairs[:, 0]).max(dim=1).values)


def _chunks(get_a, pairs: np.ndarray, get_b, chunk: int):
    """(start, local pairs (k, 2) into the chunk's rows, the chunk's uint8 rows) per `chunk` pairs: each image is
    read once per chunk."""
    for start in range(0, len(pairs), chunk):
        part = torch.from_numpy(np.ascontiguousarray(pairs[start : start + chunk]))
        ua, ia = torch.unique(part[:, 0], return_inverse=True)
        ub, ib = torch.unique(part[:, 1], return_inverse=True)
        yield start, torch.stack([ia, ib + len(ua)], 1), torch.cat([get_a(ua), (get_b or get_a)(ub)])


def copy_scores(get_a, pairs: np.ndarray, get_b=None, chunk: int = 1024, gate: float = -np.inf) -> np.ndarray:
    """Copy scores of image pairs (P, 2): pairs[:, 0] index the set whose uint8 rows get_a(index (k,)) ->
    (k, 3, S, S) returns (e.g. ImageSet.get), pairs[:, 1] the set of get_b (default: the same set). In chunks of
    `chunk` pairs: memory stays bounded. gate: a pair whose coarse score (coarse_scores) is below it differs at a
    glance and gets -inf without the box fit (the prefilter: most of a folder's neighbour pairs). -> (P,) float32."""
    out = np.full(len(pairs), -np.inf, np.float32)
    for start, local, rows in _chunks(get_a, pairs, get_b, chunk):
        images, win = prepare(rows)
        fit = coarse_scores(win, local) >= gate
        if bool(fit.any()):
            scores = pair_scores(images, win, local[fit])
            out[start + fit.nonzero().view(-1).numpy()] = scores.numpy()
    return out


def coarse_of(get_a, pairs: np.ndarray, get_b=None, chunk: int = 1024) -> np.ndarray:
    """coarse_scores of image pairs, read as copy_scores reads them -> (P,) float32."""
    out = np.zeros(len(pairs), np.float32)
    for start, local, rows in _chunks(get_a, pairs, get_b, chunk):
        out[start : start + len(local)] = coarse_scores(prepare(rows)[1], local).numpy()
    return out


def coarse_gate(true_coarse: np.ndarray) -> float:
    """The prefilter's gate from the planted copies' coarse scores with their originals: COARSE_MARGIN below the
    1 % quantile (no gate without planted copies)."""
    found = true_coarse[np.isfinite(true_coarse)]
    return float(np.quantile(found, 0.01)) - COARSE_MARGIN if len(found) else -np.inf


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
