"""Duplicates of a folder in three kinds, with a rule calibrated on the folder itself (edgessl.workflows.embed runs
it; the maths is in edgessl.evaluate.copies and edgessl.evaluate.neighbours).

- exact: the same decoded pixels (at the size the encoder sees them);
- copy: the same picture after a crop, a resize, a brightness or contrast change or a JPEG re-encoding: a candidate
  pair whose copy score (edgessl.evaluate.copies) reaches the rule's threshold;
- similar: the embedding's nearest neighbours that are not copies, at least as close as half the planted copies are
  to their originals: for browsing, never called duplicates.

Candidates come from two search spaces, each image's K nearest in either: the encoder's embedding (it knows the
folder's content) and pixel thumbnails (pixels.thumbnails: a copy stays close there even when an undertrained
encoder moves it away). In each space, pairs less close than GATE_QUANTILE of the planted copies are to their
originals are not compared: the pixel comparison runs on few pairs, not on every neighbour.

The rule: planted copies of a seeded sample of the folder's own images (edgessl.data.copies) are embedded, searched
among the folder like any image, and scored; the threshold is the lowest that reaches the target precision
(copies.choose_rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgessl.evaluate import copies as cp
from edgessl.evaluate import pixels
from edgessl.evaluate.copy_rule import Rule
from edgessl.evaluate.neighbours import CHUNK_ELEMENTS, group_pairs, top_k_neighbours

K = 8  # nearest neighbours searched for each image (and each planted copy)
GATE_QUANTILE = 0.005  # pairs less close than 99.5 % of the planted copies are to their originals are not compared
# (0.02 dropped a NEU-DET copy scoring 0.98 that a 10-epoch encoder had moved to cosine 0.21 and its crop to thumbnail
# cosine 0.77; 0.005 proposes it at 8-10 % more candidate pairs on NEU-DET and emoji, no gate at all 13-35 % more)
MARGIN = 0.1  # a pair is a copy candidate only within this of each image's best copy score (near_best)


def neighbour_pairs(idx: np.ndarray, cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) neighbour indices and cosines -> (pairs (P, 2) with i < j, each pair once; cosines (P,))."""
    n, k = idx.shape
    a = np.repeat(np.arange(n), k)
    b = idx.reshape(-1)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = lo * n + hi
    _, first = np.unique(key, return_index=True)
    return np.stack([lo[first], hi[first]], axis=1), cos.reshape(-1)[first]


@dataclass
class Calibration:
    """What the planted copies showed: each one's score with its original (true; -inf when the original was not
    among its candidates), its scores with the other images it was compared with (wrong), the embedding cosines of
    the copies to their originals, each search space's gate drawn from them, and wrong's pessimistic twin
    (doubtful: see calibrate)."""

    true: np.ndarray
    wrong: np.ndarray
    cosines: np.ndarray
    gates: list[float]
    coarse_gate: float = -np.inf  # the prefilter's gate (copies.coarse_gate), from the copies' coarse scores
    doubtful: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # wrong, counting the pairs
    # taken for copies already in the folder on the folder's own score alone (copies_in_folder) as wrong too
    wrong_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (Q, 2): each wrong
    # score's folder rows (the copy's original, the other image)

    @property
    def similar(self) -> float:
        """The cosine a pair needs to be listed as similar: the planted copies' median."""
        return float(np.median(self.cosines)) if len(self.cosines) else 1.0


def best_per_row(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """rows (P,) in 0..n-1, values (P,) -> (n,) float32: the largest value of each row, -inf for a row without one."""
    best = np.full(n, -np.inf, np.float32)
    np.maximum.at(best, rows, values)
    return best


def best_pair_per_row(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """rows (P,), values (P,) -> the index of each row's largest finite value (ties: the first), by row: the pairs
    best_per_row's finite entries come from, in the same order."""
    keep = np.flatnonzero(np.isfinite(values))
    order = keep[np.lexsort((-values[keep], rows[keep]))]  # by row, then the largest value first
    _, first = np.unique(rows[order], return_index=True)
    return order[first]


def planted_candidates(planted: list[np.ndarray], originals: np.ndarray, folder: list[np.ndarray]):
    """Per search space s, planted[s] (M, D_s) and folder[s] (N, D_s) unit rows -> (pairs (Q, 2) (planted row,
    folder row), each once; gates per space; the embedding cosines (M,) of the copies to their originals). The
    planted rows go in chunks (at most CHUNK_ELEMENTS similarities at once): memory stays bounded on any folder."""
    found, gates, cosines = [], [], None
    k = min(K, folder[0].shape[0])
    step = max(1, CHUNK_ELEMENTS // max(folder[0].shape[0], 1))
    for p, f in zip(planted, folder, strict=True):
        true = (p * f[originals]).sum(axis=1).astype(np.float32)
        cosines = true if cosines is None else cosines
        gates.append(float(np.quantile(true, GATE_QUANTILE)) if len(true) else 1.0)
        for start in range(0, len(p), step):
            sims = p[start : start + step] @ f.T  # (c, N)
            idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.argsort(-sims, axis=1)
            keep = np.take_along_axis(sims, idx, axis=1) >= gates[-1]
            rows = np.broadcast_to(np.arange(start, start + len(sims))[:, None], idx.shape)
            found.append(np.stack([rows[keep], idx[keep]], axis=1))
    pairs = np.unique(np.concatenate(found).reshape(-1, 2), axis=0)
    return pairs, gates, cosines


def calibrate(planted: list[np.ndarray], originals: np.ndarray, folder: list[np.ndarray], get_planted,
              get_rows, sides: tuple | None = None, hashes: list[str] | None = None) -> Calibration:
    """planted / folder: per search space (the embedding first, then the thumbnails) the planted copies' (M, D) and
    the folder's (N, D) unit rows; originals (M,): each copy's original's row; get_planted / get_rows: their uint8
    pixel rows; sides: (planted, folder) shorter-side getters (copies.copy_scores' sides_a, sides_b), or None;
    hashes: the folder's pixel hashes (pixels.pixel_hashes): a copy's match with an exact twin of its original is
    never a false match, whatever it scores.

    true (M,): each copy's score with its original, -inf when it was not a candidate or fell more than MARGIN below
    the copy's best match (near_best drops it in the folder too). wrong: per copy, its best score with any other
    image (not a copy the folder already holds): an image without a copy keeps its best look-alike through
    near_best, so this is what such an image scores; the threshold must stay above it. doubtful: the same, also
    counting the images excused as copies of the original on the folder's own score alone (copies_in_folder), which
    a look-alike scoring like a copy passes too: the pessimistic twin of wrong. wrong_pairs: the folder rows (the
    copy's original, the other image) of each wrong score, for the output to name the pair that set the threshold."""
    pairs, gates, cosines = planted_candidates(planted, originals, folder)
    sides_planted, sides_rows = sides or (None, None)
    scores = (cp.copy_scores(get_planted, pairs, get_rows, sides_a=sides_planted, sides_b=sides_rows) if len(pairs)
              else np.zeros(0, np.float32))
    best = best_per_row(pairs[:, 0], scores, len(originals))
    is_true = pairs[:, 1] == originals[pairs[:, 0]]
    true = np.full(len(originals), -np.inf, np.float32)
    true[pairs[is_true, 0]] = np.where(scores[is_true] >= best[pairs[is_true, 0]] - MARGIN, scores[is_true], -np.inf)
    excused, on_own = copies_in_folder(pairs[~is_true], scores[~is_true], originals, true, get_rows, sides_rows)
    if hashes is not None:  # the same pixels as the original: the same picture, found as well as the original is
        twin = np.array([hashes[originals[c]] == hashes[x] for c, x in pairs[~is_true].tolist()], bool).reshape(-1)
        excused, on_own = excused | twin, on_own & ~twin
    wrong, unsure = ~is_true, np.zeros(len(pairs), bool)
    wrong[~is_true], unsure[~is_true] = ~excused, on_own
    top = best_pair_per_row(pairs[:, 0], np.where(wrong, scores, -np.inf))
    doubt = best_per_row(pairs[wrong | unsure, 0], scores[wrong | unsure], len(originals))
    gate = cp.coarse_gate(cp.coarse_of(get_planted, pairs[is_true], get_rows))
    wrong_pairs = np.stack([originals[pairs[top, 0]], pairs[top, 1]], axis=1)
    return Calibration(true, scores[top].astype(np.float32), cosines, gates, gate, doubt[np.isfinite(doubt)],
                       wrong_pairs)


EXCUSE_QUANTILE = 0.05  # a folder image matching the original as well as 95 % of planted copies do is its copy
CHECK_QUANTILE = 0.01  # wrong pairs scoring below 99 % of the planted copies cannot move the threshold much
EXCUSE_MARGIN = 0.08  # a planted copy matching x within this of its own original: x holds the same picture


def copies_in_folder(pairs: np.ndarray, scores: np.ndarray, originals: np.ndarray, true: np.ndarray,
                     get_rows, sides=None) -> tuple[np.ndarray, np.ndarray]:
    """pairs (Q, 2) (planted copy c of original o, folder image x != o) scored `scores` -> (copy (Q,) bool: x is itself
    a copy of o already in the folder (a twin, a re-encoded file), so the pair is no false match; unsure (Q,) bool:
    the copies judged on the folder's own score of (o, x) alone, which a look-alike scoring as high as a copy passes
    too (Calibration.doubtful counts them, so the estimate can say how much rests on them)). Checked for the pairs
    scoring at least the CHECK_QUANTILE quantile of the true scores (lower ones move the threshold only where it
    would miss more than that share of the copies anyway): x is a copy of o when the folder's own score of (o, x)
    reaches the EXCUSE_QUANTILE quantile of the true scores, or when c matches x within EXCUSE_MARGIN of how well it
    matches o (two copies of one picture can match each other as well as either matches the sharper original; two
    overlapping scans of one surface hold c's crop both; a look-alike, another flag or figure, stays further below:
    measured 0.13-0.39 below on emoji, while such copies and overlaps were 0.01-0.055 below on NEU-DET: at 0.05, one
    real copy 0.055 below had raised a NEU-DET folder's threshold from 0.82 to 0.91 and cut its recall from 0.96 to
    0.88)."""
    out, unsure = np.zeros(len(pairs), bool), np.zeros(len(pairs), bool)
    found = true[np.isfinite(true)]
    if not len(found):
        return out, unsure
    bar = float(np.quantile(found, EXCUSE_QUANTILE))
    check = scores >= float(np.quantile(found, CHECK_QUANTILE))
    if check.any():
        same = scores[check] >= true[pairs[check, 0]] - EXCUSE_MARGIN
        out[check] = same
        rest = np.flatnonzero(check)[~same]  # only these need the folder's own score of (o, x)
        if len(rest):
            own = np.stack([originals[pairs[rest, 0]], pairs[rest, 1]], axis=1)
            out[rest] = unsure[rest] = cp.copy_scores(get_rows, own, sides_a=sides) >= bar
    return out, unsure


@dataclass
class Found:
    """The duplicates of a folder: groups of exact and copy pairs, and the similar pairs."""

    pairs: np.ndarray  # (P, 2) duplicate pairs (exact and copy)
    kinds: list[str]  # (P,) "exact" | "copy"
    scores: np.ndarray  # (P,) copy score (1.0 for exact)
    cosines: np.ndarray  # (P,) embedding cosine
    groups: np.ndarray  # (P,) group numbers 1..G
    similar: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (S, 2)
    similar_cosines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass
class Scored:
    """The folder's candidate pairs: exact twins, and the other neighbour pairs with their cosines and copy scores
    (-inf below the gate)."""

    exact: np.ndarray  # (E, 2)
    pairs: np.ndarray  # (P, 2)
    cosines: np.ndarray  # (P,)
    scores: np.ndarray  # (P,)
    compared: int = 0  # pairs compared in full (the others stopped at the coarse prefilter)


def folder_candidates(spaces: list[np.ndarray], gates: list[float], use_faiss: bool | None = None) -> np.ndarray:
    """(P, 2) pairs (i < j), each once: in any search space (N, D_s) unit rows, one is among the other's K nearest
    at a similarity reaching that space's gate."""
    found = []
    for unit, gate in zip(spaces, gates, strict=True):
        idx, cos = top_k_neighbours(unit, K, use_faiss=use_faiss)
        pairs, pcos = neighbour_pairs(idx, cos)
        found.append(pairs[pcos >= gate])
    return np.unique(np.concatenate(found).reshape(-1, 2), axis=0)


def score_folder(spaces: list[np.ndarray], hashes: list[str], get_rows: Callable, gates: list[float],
                 use_faiss: bool | None = None, coarse_gate: float = -np.inf, sides: Callable | None = None) -> Scored:
    """Exact twins (equal hashes) and every other candidate pair (folder_candidates) with its embedding cosine
    (spaces[0]) and copy score (-inf below the prefilter's `coarse_gate`; sides: copies.copy_scores' sides_a)."""
    pairs = folder_candidates(spaces, gates, use_faiss)
    same = np.array([hashes[a] == hashes[b] for a, b in pairs.tolist()], bool).reshape(-1)
    pairs = pairs[~same]
    unit = spaces[0]
    cosines = (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(axis=1).astype(np.float32)
    scores = (cp.copy_scores(get_rows, pairs, gate=coarse_gate, sides_a=sides) if len(pairs)
              else np.zeros(0, np.float32))
    return Scored(pixels.exact_pairs(hashes), pairs, cosines, near_best(pairs, scores, len(hashes)),
                  int(np.isfinite(scores).sum()))


def near_best(pairs: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """pairs (P, 2) of n images scored `scores` -> the scores, -inf where the pair is more than MARGIN below either
    image's best pair: a copy matches its original far better than the original's look-alikes (a blurred or small
    copy matches a look-alike too, but its original better still), so only the best matches of each image count."""
    best = np.maximum(best_per_row(pairs[:, 0], scores, n), best_per_row(pairs[:, 1], scores, n))
    keep = (scores >= best[pairs[:, 0]] - MARGIN) & (scores >= best[pairs[:, 1]] - MARGIN)
    return np.where(keep, scores, -np.inf).astype(np.float32)


def classify(scored: Scored, unit: np.ndarray, rule: Rule, similar: float) -> Found:
    """Duplicates (exact twins, and pairs scoring >= rule.threshold: copies) in groups, and the similar pairs (the
    other neighbour pairs at cosine >= `similar`)."""
    exact = scored.exact
    copy = scored.scores >= rule.threshold
    dup = np.concatenate([exact, scored.pairs[copy]]).astype(np.int64).reshape(-1, 2)
    exact_cos = (unit[exact[:, 0]] * unit[exact[:, 1]]).sum(axis=1) if len(exact) else np.zeros(0, np.float32)
    found = Found(dup, ["exact"] * len(exact) + ["copy"] * int(copy.sum()),
                  np.concatenate([np.ones(len(exact), np.float32), scored.scores[copy]]),
                  np.concatenate([exact_cos, scored.cosines[copy]]).astype(np.float32), group_pairs(len(unit), dup))
    close = np.flatnonzero(~copy & (scored.cosines >= similar))
    close = close[first_per_twins(scored.pairs[close], exact, len(unit))]
    found.similar, found.similar_cosines = scored.pairs[close], scored.cosines[close]
    return found


def first_per_twins(pairs: np.ndarray, exact: np.ndarray, n: int) -> np.ndarray:
    """Indices into pairs (P, 2) keeping the first pair of each pair of exact-twin groups (exact: (E, 2) pairs of
    the same pixels among n images): an image with two twins is one picture, not three similar pairs."""
    first = np.arange(n)
    for a, b in sorted(map(sorted, exact.tolist())):  # a < b: each twin points at its group's first image
        first[b] = first[a]
    keys = np.sort(first[pairs], axis=1) if len(pairs) else np.zeros((0, 2), np.int64)
    _, keep = np.unique(keys, axis=0, return_index=True)
    return np.sort(keep)
