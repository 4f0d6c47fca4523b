"""Copies of one picture among a folder's images: the pixel-level score of a pair and its coarse prefilter (pure
functions; exact twins and the candidates' thumbnails are in edgessl.evaluate.pixels, edgessl.evaluate.copy_rule
chooses the threshold, edgessl.workflows.embed wires them).

The copy score of two images a, b: both are smoothed and compared on a DESC x DESC grid, each window band-passed
after the alignment (shading and flat colour removed, the same content on both sides). A box in a (centre and
half-sizes, so a crop that kept more of the width than of the height is found too) is fitted by gradient ascent on
its normalised cross-correlation (NCC) with the whole of b, from the whole image and from the best of a coarse set
of square crops, in both directions (a box in b against the whole of a); the better fit is judged by its worst
patch (pair_scores). A crop, a resize, a brightness or contrast change and JPEG noise leave it near 1; another
picture, even a similar one, scores lower. Flat images score 0.

Cost: an image's coarse windows cost far more than a pair's NCC, so coarse_of prepares each image once and scans it
against the whole windows of all its partners, and only the pairs that pass its gate are fitted.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgessl.data.folder import LARGE_SIDE
from edgessl.evaluate.coarse import best_window_ncc
from edgessl.evaluate.resolution import MATCH_FLOOR, match_resolution, row_sides

DESC = 24  # pixels on each side of a compared window
SCALES = (0.95, 0.9, 0.85)  # the coarse search's square crops (share of each side kept)
POSITIONS = (0.0, 0.5, 1.0)  # where a coarse crop sits, as a share of the room it has
STEPS = 15  # gradient steps of the box fit (Adam)
LR = 0.015  # Adam's step, in units of the half image (the box moves at most STEPS * LR = 0.225 of it)
BAND = 0.2  # the band-pass neighbourhood, a share of the window's side (5 of the DESC pixels)
GRID = 8  # the residual of the best alignment is judged patch by patch: GRID x GRID patches (3 x 3 pixels)
SMOOTH = 0.5  # the Gaussian blur before comparing, in comparison pixels (sigma)
CHROMA_SMOOTH = 1.0  # the colour around the luma blurred this much more, in comparison pixels (chroma_blur)
LUMA = (0.299, 0.587, 0.114)  # BT.601 luma weights, as JPEG's Y
FLAT = 1e-3  # a window whose pixel spread (0..1 scale) is below this has no contrast: it scores 0


def box_mean_matrix(d: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(d, d) A: (A @ v)[i] is the mean of v[j] over |i - j| <= k // 2 within 0..d-1 (k taps, clipped at the edges)."""
    i = torch.arange(d)
    near = ((i[:, None] - i[None, :]).abs() <= k // 2).to(dtype)
    return near / near.sum(dim=1, keepdim=True)


def band_pass(x: torch.Tensor) -> torch.Tensor:
    """(P, C, D, D) aligned windows (0..1) -> the same, each pixel minus the mean of its neighbourhood (BAND of the
    window's side, clipped at the window's edge): shading and flat colour do not count, edges and texture do. Applied
    after the alignment, so both windows of a pair see the same content up to the same edges (a band-pass of the
    whole image would differ along a crop's new border). The separable box mean is A x A^T (box_mean_matrix): two
    small matrix products, a third of the time of two clipped average pools."""
    a = box_mean_matrix(x.shape[-1], max(3, int(round(BAND * x.shape[-1])) | 1), x.dtype)
    return x - a @ x @ a.T


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


def gaussian_matrix(d: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(d, d) G: (G @ v) is v (d,) blurred by a Gaussian of `sigma` samples, the edge sample repeated beyond it."""
    k = torch.arange(-int(3 * sigma) - 1, int(3 * sigma) + 2)
    g = torch.exp(-k.float() ** 2 / (2 * sigma * sigma)).expand(d, -1)
    src = (torch.arange(d)[:, None] + k[None, :]).clamp(0, d - 1)  # (d, taps): replicate padding
    return torch.zeros(d, d).scatter_add_(1, src, g / g.sum(dim=1, keepdim=True)).to(dtype)


def chroma_blur(x: torch.Tensor) -> torch.Tensor:
    """(P, 3, D, D) aligned colour windows -> the colour around the luma (BT.601, JPEG's Y) blurred by a Gaussian
    of CHROMA_SMOOTH pixels (G x G^T), the luma kept. JPEG keeps colour at half the resolution (4:2:0): a copy
    shrunk to half and saved as JPEG keeps a quarter of its original's colour detail, its colour bleeds over edges.
    On the aligned windows, like the band-pass (a crop's new border sees the same content on both sides)."""
    luma = (x * torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    g = gaussian_matrix(x.shape[-1], CHROMA_SMOOTH, x.dtype)
    return luma + g @ (x - luma) @ g.T


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
    norm = x.flatten(1).norm(dim=1)
    scale = torch.where(norm < FLAT * DESC, torch.zeros_like(norm), 1 / norm.clamp_min(1e-12))
    return x * scale[:, None, None, None]


WHOLE = (0.0, 0.0, 1.0, 1.0)


def coarse_boxes() -> torch.Tensor:
    """(W, 4) the coarse search's boxes (cx, cy, hx, hy): the whole image, then SCALES x POSITIONS x POSITIONS
    square crops."""
    boxes = [WHOLE]
    for s in SCALES:
        boxes += [((2 * u - 1) * (1 - s), (2 * v - 1) * (1 - s), s, s) for v in POSITIONS for u in POSITIONS]
    return torch.tensor(boxes)


def axis_weights(centre: torch.Tensor, half: torch.Tensor, size: int) -> torch.Tensor:
    """centre, half (W,) of boxes along one axis in grid_sample's coordinates -> (W, DESC, size) R: R @ v samples v
    (size,) at the box's DESC cell centres as grid_sample does (bilinear, align_corners=False, border padding)."""
    t = (torch.arange(DESC, dtype=centre.dtype) + 0.5) / DESC * 2 - 1
    pos = (((centre[:, None] + half[:, None] * t) + 1) * size - 1) / 2  # (W, DESC) in pixels
    pos = pos.clamp(0, size - 1)
    lo = pos.floor().long().clamp(max=size - 1)
    frac = pos - lo
    hi = (lo + 1).clamp(max=size - 1)
    r = torch.zeros(*pos.shape, size, dtype=centre.dtype)
    r.scatter_add_(2, lo[..., None], (1 - frac)[..., None])
    return r.scatter_add_(2, hi[..., None], frac[..., None])


def sample_fixed(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """images (U, C, S, S); boxes (W, 4), the same for every image -> (U, W, C, DESC, DESC): sample() of each box
    of each image, as two small matrix products per box (bilinear sampling is separable) instead of W copies of
    every image."""
    s = images.shape[-1]
    ry = axis_weights(boxes[:, 1], boxes[:, 3], s).to(images.dtype)  # (W, DESC, S)
    rx = axis_weights(boxes[:, 0], boxes[:, 2], s).to(images.dtype)
    rows = torch.einsum("wys,ucsx->uwcyx", ry, images)
    return torch.einsum("uwcyx,wtx->uwcyt", rows, rx)


SAMPLE_FLOATS = 1 << 24  # prepare() samples the coarse windows of this many floats' worth of images at a time


def prepare(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, 3, S, S) uint8 -> (smoothed images in 0..1 (U, 3, S, S), their unit coarse windows (U, W, F)): what
    pair_scores compares."""
    images = smooth(rows.float() / 255)
    boxes = coarse_boxes()
    n, w = len(rows), len(boxes)
    step = max(1, SAMPLE_FLOATS // (w * 3 * DESC * images.shape[-1]))  # sample_fixed's (k, W, 3, DESC, S) rows
    win = torch.cat([unit(sample_fixed(part, boxes).reshape(-1, 3, DESC, DESC)) for part in images.split(step)])
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

    In each direction (a box in a against the whole b, and the reverse) the box is fitted (fit_box) from the whole
    image and from the best coarse window; the direction with the higher NCC wins. Both windows are then compared
    at the colour resolution a copy keeps (chroma_blur); the residual e = unit(box) - unit(whole) is cut into
    GRID x GRID patches and the score is 1 - GRID^2 * max_patch |e_p|^2 / 2: the NCC as if the worst patch's residual
    covered the whole image. A copy's residual (JPEG noise, resampling) is spread over the picture; a different
    picture that matches except for one detail (a figure in a group, a flag's emblem, another scan of the same
    surface) concentrates it in some patch. colour: the score is at most the same worst-patch score of the colours
    in the same box, brightness and contrast removed (unit_joint: a skin-tone or colour variant has the same edges,
    not the same colours), at most 1 - CHROMA_SLOPE x chroma_shift (a change of hue) and at most tone_cap of the
    pair's luminance gain (a dark and a light grey square on white: the same normalised pattern, a contrast no
    brightness or contrast edit of a copy reaches)."""
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
    box = torch.where(use_ab[:, None], fits[0][2], fits[1][2])
    a = chroma_blur(sample(images[src], box))  # the fitted box, compared at the colour resolution a copy keeps
    b = chroma_blur(sample(images[dst], torch.tensor(WHOLE).expand(p, 4)))
    score = worst_patch(unit(a), unit(b))
    if colour:  # the same box on the colours themselves: a recoloured look-alike differs there
        score = torch.minimum(score, worst_patch(unit_joint(a), unit_joint(b)))
        gain = luminance_gain(a, b)  # one fit serves both caps
        score = torch.minimum(score, 1 - CHROMA_SLOPE * chroma_shift(a, b, gain))
        score = torch.minimum(score, tone_cap(gain))
    flat = (win[pairs[:, 0], 0].abs().sum(dim=1) == 0) | (win[pairs[:, 1], 0].abs().sum(dim=1) == 0)
    return torch.where(flat, torch.zeros_like(score), score)


def worst_patch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (P, 3, DESC, DESC) unit windows -> (P,) 1 - GRID^2 * max_patch |a_p - b_p|^2 / 2: their dot product as
    if the worst of the GRID x GRID patches' residual covered the whole window."""
    e = (a - b).view(len(a), 3, GRID, DESC // GRID, GRID, DESC // GRID)
    return 1 - GRID * GRID * e.square().sum(dim=(1, 3, 5)).flatten(1).max(dim=1).values / 2


CHROMA_SLOPE = 2.0  # the score is at most 1 - CHROMA_SLOPE x chroma_shift: 0.1 -> 0.8, 0.2 -> 0.6
GAIN = (0.75, 1.33)  # the brightness gains chroma_shift allows: the copy model's (0.9 x 0.9 to 1.1 x 1.1) and more


TONE_FREE = 0.22  # |ln gain| a copy may show: the copy model's brightness x contrast (0.9 x 0.9 to 1.1 x 1.1)
TONE_SLOPE = 5.0  # beyond it, the score's cap falls this much per unit of |ln gain| (0.32 -> 0.5)


def luminance_gain(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (P, 3, D, D) colours in 0..1 -> (P,) the gain g of the least-squares fit b ~ g a + o of their luminance
    (the mean of the channels) over the window: 1 for a flat a, at most 0 for an inverted b."""
    la, lb = a.mean(dim=1), b.mean(dim=1)
    la, lb = la - la.mean(dim=(1, 2), keepdim=True), lb - lb.mean(dim=(1, 2), keepdim=True)
    energy = la.square().sum(dim=(1, 2))
    return torch.where(energy > FLAT, (la * lb).sum(dim=(1, 2)) / energy.clamp_min(1e-12), torch.ones_like(energy))


def tone_cap(gain: torch.Tensor) -> torch.Tensor:
    """(P,) luminance gains -> (P,) the most a pair with that gain may score: 1 up to |ln g| = TONE_FREE, then
    falling by TONE_SLOPE per unit of |ln g| (g <= 0.001 counts as 0.001). Of 1,600 planted copies (4 folders, seed
    11) scoring above 0.5, 2 exceed |ln g| = 0.25, 1 exceeds 0.3; of as many mildly blurred ones, none 0.2."""
    excess = (gain.clamp_min(1e-3).log().abs() - TONE_FREE).clamp_min(0)
    return 1 - TONE_SLOPE * excess


def chroma_shift(a: torch.Tensor, b: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    """a, b (P, 3, D, D) colours in 0..1 -> (P,) the largest change of colour among GRID x GRID patches: each patch's
    mean colour differences (R - G, (R + G) / 2 - B) of b against a's times a's brightness gain g onto b (gain:
    luminance_gain(a, b) when the caller has it, clamped to GAIN). A brightness or contrast change gives 0; a hue
    change of an area gives its shift (orange 255,152,0 -> yellow 255,204,50 over a patch: 0.22). On 500 planted
    copies per folder, before chroma_blur: at most 0.20 on emoji, 0.22 on CIFAR-10, 0 on greyscale scans."""
    g = luminance_gain(a, b) if gain is None else gain

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


def _chunks(get_a, pairs: np.ndarray, get_b, chunk: int, sides_a=None, sides_b=None):
    """(start, local pairs (k, 2) into its rows, its uint8 rows, None or resolution.row_sides) per `chunk` pairs."""
    for start in range(0, len(pairs), chunk):
        part = torch.from_numpy(np.ascontiguousarray(pairs[start : start + chunk]))
        ua, ia = torch.unique(part[:, 0], return_inverse=True)
        ub, ib = torch.unique(part[:, 1], return_inverse=True)
        yield (start, torch.stack([ia, ib + len(ua)], 1), torch.cat([get_a(ua), (get_b or get_a)(ub)]),
               None if sides_a is None else row_sides(ua, ub, sides_a, sides_b or sides_a))


def at_coarser(scores: torch.Tensor, images, win, rows: torch.Tensor, pairs: torch.Tensor, sides) -> torch.Tensor:
    """scores (P,) of pairs (P, 2) (images, win: prepare(rows)) -> each raised to the pair's score at its coarser
    image's resolution where higher (match_resolution; only pairs scoring MATCH_FLOOR or more read their sizes)."""
    near = torch.nonzero(scores >= MATCH_FLOOR).squeeze(1)
    known, used = torch.full((len(rows),), LARGE_SIDE, dtype=torch.long), torch.unique(pairs[near])
    known[used] = sides(used)
    grown, matched, which = match_resolution(rows, pairs[near], known)
    if not len(which):
        return scores
    more_images, more_win = prepare(grown[len(rows) :])
    again = pair_scores(torch.cat([images, more_images]), torch.cat([win, more_win]), matched)
    scores = scores.clone()
    scores[near[which]] = torch.maximum(scores[near[which]], again)
    return scores


def copy_scores(get_a, pairs: np.ndarray, get_b=None, chunk: int = 1024, gate: float = -np.inf, sides_a=None,
                sides_b=None) -> np.ndarray:
    """Copy scores of image pairs (P, 2): pairs[:, 0] index the set whose uint8 rows get_a(index (k,)) ->
    (k, 3, S, S) returns (e.g. ImageSet.get), pairs[:, 1] the set of get_b (default: the same set). In chunks of
    `chunk` pairs: memory stays bounded. gate: a pair whose coarse score (coarse_of) is below it differs at a
    glance and gets -inf without the box fit (the prefilter: most of a folder's neighbour pairs). sides_a / sides_b:
    index (k,) -> (k,) each file's shorter side as stored (data.folder.shorter_sides; sides_b defaults to sides_a):
    a small copy is then not marked down for detail it never had (at_coarser). -> (P,) float32."""
    if get_b is not None and (sides_a is None) != (sides_b is None):
        raise ValueError("copy_scores: two sets of images need the sides of both or of neither")
    out = np.full(len(pairs), -np.inf, np.float32)
    fit = np.arange(len(pairs)) if gate == -np.inf else np.flatnonzero(coarse_of(get_a, pairs, get_b) >= gate)
    size = get_a(torch.from_numpy(pairs[fit[:1], 0])).shape[-1] if len(fit) else 0
    for start, local, rows, sides in _chunks(get_a, pairs[fit], get_b, fit_chunk(chunk, size), sides_a, sides_b):
        images, win = prepare(rows)
        scores = pair_scores(images, win, local)
        if sides is not None:
            scores = at_coarser(scores, images, win, rows, local, sides)
        out[fit[start : start + len(local)]] = scores.numpy()
    return out


FIT_SIZE = 64  # images up to this side are fitted `chunk` pairs at a time; larger ones in fewer (fit_chunk)
SCAN_IMAGES = 64  # images whose coarse windows are prepared and scanned at a time (coarse_of)


def fit_chunk(chunk: int, size: int) -> int:
    """Pairs fitted at a time for images of `size` px: `chunk` up to FIT_SIZE, fewer as the pixels grow (the fit's
    memory grows with the pairs' pixels: 1,024 pairs of 224 px images reached 9 GiB), at least 16."""
    return chunk if size <= FIT_SIZE else max(16, chunk * FIT_SIZE * FIT_SIZE // (size * size))


def coarse_of(get_a, pairs: np.ndarray, get_b=None) -> np.ndarray:
    """The coarse scores (coarse.coarse_between: the best NCC of a coarse window of either image with the whole of
    the other, what the box fit starts from) of image pairs (P, 2) (get_a, get_b as in copy_scores) -> (P,) float32.

    Each image's W coarse windows cost far more than a pair's NCC, and a folder's neighbour pairs name each image
    about a dozen times. So the whole windows (F floats an image, 1/W of its windows) of every image with pairs are
    computed first and kept (0.35 GB for 50,000 images), and then each image's windows are prepared once,
    SCAN_IMAGES images at a time, and scanned against the whole windows of all its partners at once
    (coarse.best_window_ncc), in both directions of every pair."""
    if not len(pairs):
        return np.zeros(0, np.float32)
    if get_b is None:  # one set: both directions of every pair scanned with each image's windows prepared once
        rows = np.unique(pairs)
        whole = _wholes(get_a, rows)
        scanners, partners = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
        both = _scan(get_a, scanners, np.searchsorted(rows, partners), whole).view(2, -1)
        return torch.maximum(both[0], both[1]).numpy()
    rows_a, rows_b = np.unique(pairs[:, 0]), np.unique(pairs[:, 1])
    whole_a, whole_b = _wholes(get_a, rows_a), _wholes(get_b, rows_b)
    ab = _scan(get_a, pairs[:, 0], np.searchsorted(rows_b, pairs[:, 1]), whole_b)
    ba = _scan(get_b, pairs[:, 1], np.searchsorted(rows_a, pairs[:, 0]), whole_a)
    return torch.maximum(ab, ba).numpy()


def _wholes(get, rows: np.ndarray) -> torch.Tensor:
    """rows (k,) -> (k, F) their unit whole windows (prepare()'s first window), SCAN_IMAGES images at a time. The
    smoothing and the whole box's sampling are both linear and separable, so one (DESC, S) matrix M does both:
    M X M^T per channel, without blurring the full image."""
    out = torch.empty(len(rows), 3 * DESC * DESC)
    m = None
    for start in range(0, len(rows), SCAN_IMAGES):
        images = get(torch.from_numpy(rows[start : start + SCAN_IMAGES])).float() / 255
        if m is None:
            s, box = images.shape[-1], coarse_boxes()[0]
            m = axis_weights(box[:1], box[2:3], s)[0] @ gaussian_matrix(s, SMOOTH * s / DESC)
        out[start : start + SCAN_IMAGES] = unit(m @ images @ m.T).flatten(1)
    return out


def _scan(get, scanners: np.ndarray, partners: np.ndarray, whole: torch.Tensor) -> torch.Tensor:
    """scanners (Q,) rows of get's set, partners (Q,) rows of `whole` (M, F) -> (Q,) the best NCC of a coarse window
    of each scanner with its partner's whole window; each scanner image prepared once."""
    out = torch.empty(len(scanners))
    order = np.argsort(scanners, kind="stable")
    rows, first = np.unique(scanners[order], return_index=True)
    bounds = np.append(first, len(order))
    for lo in range(0, len(rows), SCAN_IMAGES):
        part, hi = rows[lo : lo + SCAN_IMAGES], min(lo + SCAN_IMAGES, len(rows))
        sel = order[bounds[lo] : bounds[hi]]
        win = prepare(get(torch.from_numpy(part)))[1]
        out[torch.from_numpy(sel)] = best_window_ncc(win, np.searchsorted(part, scanners[sel]), whole, partners[sel])
    return out


def coarse_gate(true_coarse: np.ndarray) -> float:
    """The prefilter's gate from the planted copies' coarse scores with their originals: COARSE_MARGIN below the
    1 % quantile (no gate without planted copies)."""
    found = true_coarse[np.isfinite(true_coarse)]
    return float(np.quantile(found, 0.01)) - COARSE_MARGIN if len(found) else -np.inf
