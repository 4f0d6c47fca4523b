"""Duplicates of a folder in three kinds, with a rule calibrated on the folder itself (edgessl.workflows.embed runs
it; the maths is in edgessl.evaluate.copies and edgessl.evaluate.neighbours).

- exact: the same decoded pixels (at the size the encoder sees them);
- copy: the same picture after a crop, a resize, a brightness or contrast change or a JPEG re-encoding: a pair of
  the embedding's nearest neighbours whose copy score (edgessl.evaluate.copies) reaches the rule's threshold;
- similar: the embedding's nearest neighbours that are not copies, at least as close as half the planted copies are
  to their originals: for browsing, never called duplicates.

The rule: planted copies of a seeded sample of the folder's own images (edgessl.data.copies) are embedded, searched
among the folder like any image, and scored; the threshold is the lowest that reaches the target precision
(copies.choose_rule). Pairs whose embedding cosine is below the GATE_QUANTILE quantile of the planted copies' are
not scored (a copy is that close to its original in all but that share of cases): the pixel comparison runs on
few pairs, not on every neighbour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgessl.evaluate import copies as cp
from edgessl.evaluate.neighbours import group_pairs, top_k_neighbours

K = 8  # nearest neighbours searched for each image (and each planted copy)
GATE_QUANTILE = 0.02  # pairs less close than 98 % of the planted copies are to their originals are not compared


def neighbour_pairs(idx: np.ndarray, cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) neighbour indices and cosines -> (pairs (P, 2) with i < j, each pair once; cosines (P,))."""
    n, k = idx.shape
    a = np.repeat(np.arange(n), k)
    b = idx.reshape(-1)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = lo * n + hi
    _, first = np.unique(key, return_index=True)
    return np.stack([lo[first], hi[first]], axis=1), cos.reshape(-1)[first]


def gated_scores(get_a, pairs: np.ndarray, cos: np.ndarray, gate: float, get_b=None) -> np.ndarray:
    """Copy scores of the pairs whose cosine reaches `gate`; -inf for the others (never a copy)."""
    out = np.full(len(pairs), -np.inf, np.float32)
    keep = cos >= gate
    if keep.any():
        out[keep] = cp.copy_scores(get_a, pairs[keep], get_b)
    return out


@dataclass
class Calibration:
    """What the planted copies showed: each one's score with its original (true; -inf when the original was not
    among its neighbours or below the gate), its scores with the other images it was compared with (wrong), the
    cosines of the copies to their originals, and the gate drawn from them."""

    true: np.ndarray
    wrong: np.ndarray
    cosines: np.ndarray
    gate: float

    @property
    def similar(self) -> float:
        """The cosine a pair needs to be listed as similar: the planted copies' median."""
        return float(np.median(self.cosines)) if len(self.cosines) else 1.0


def calibrate(planted_unit: np.ndarray, originals: np.ndarray, unit: np.ndarray, get_planted, get_rows) -> Calibration:
    """planted_unit (M, D): the planted copies' unit embeddings; originals (M,): the row of each copy's original in
    unit (N, D), the folder's unit embeddings; get_planted / get_rows: their uint8 pixel rows."""
    sims = planted_unit @ unit.T  # (M, N): M is a few hundred, so this stays small
    cosines = sims[np.arange(len(originals)), originals].astype(np.float32)
    gate = float(np.quantile(cosines, GATE_QUANTILE)) if len(cosines) else 1.0
    k = min(K, unit.shape[0])
    idx = np.argsort(-sims, axis=1)[:, :k]
    pairs = np.stack([np.repeat(np.arange(len(originals)), k), idx.reshape(-1)], axis=1)
    scores = gated_scores(get_planted, pairs, sims[pairs[:, 0], pairs[:, 1]], gate, get_rows)
    is_true = pairs[:, 1] == originals[pairs[:, 0]]
    true = np.full(len(originals), -np.inf, np.float32)
    true[pairs[is_true, 0]] = scores[is_true]
    wrong = ~is_true & np.isfinite(scores)
    wrong[wrong] = ~copies_in_folder(pairs[wrong], scores[wrong], originals, true, get_rows)
    return Calibration(true, scores[wrong], cosines, gate)


def copies_in_folder(pairs: np.ndarray, scores: np.ndarray, originals: np.ndarray, true: np.ndarray,
                     get_rows) -> np.ndarray:
    """pairs (Q, 2) (planted copy, folder image x) scored `scores`, not the copy's original o -> (Q,) bool: x is
    itself a copy of o already in the folder (a twin, a re-encoded file), so the pair is no false match: the folder's
    own score of (o, x) reaches the planted copies' median true score. Only pairs that score at least the lowest
    true score are checked (the others never move the threshold)."""
    out = np.zeros(len(pairs), bool)
    found = true[np.isfinite(true)]
    if not len(found):
        return out
    check = scores >= found.min()
    if check.any():
        own = np.stack([originals[pairs[check, 0]], pairs[check, 1]], axis=1)
        out[check] = cp.copy_scores(get_rows, own) >= np.median(found)
    return out


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


def score_folder(unit: np.ndarray, hashes: list[str], get_rows: Callable, gate: float,
                 use_faiss: bool | None = None) -> Scored:
    """Exact twins (equal hashes) and every other pair of K nearest neighbours, scored when its cosine reaches the
    gate."""
    idx, cos = top_k_neighbours(unit, K, use_faiss=use_faiss)
    pairs, pcos = neighbour_pairs(idx, cos)
    same = np.array([hashes[a] == hashes[b] for a, b in pairs.tolist()], bool).reshape(-1)
    pairs, pcos = pairs[~same], pcos[~same]
    return Scored(cp.exact_pairs(hashes), pairs, pcos, gated_scores(get_rows, pairs, pcos, gate))


def classify(scored: Scored, unit: np.ndarray, rule: cp.Rule, similar: float) -> Found:
    """Duplicates (exact twins, and pairs scoring >= rule.threshold: copies) in groups, and the similar pairs (the
    other neighbour pairs at cosine >= `similar`)."""
    exact = scored.exact
    copy = scored.scores >= rule.threshold
    dup = np.concatenate([exact, scored.pairs[copy]]).astype(np.int64).reshape(-1, 2)
    exact_cos = (unit[exact[:, 0]] * unit[exact[:, 1]]).sum(axis=1) if len(exact) else np.zeros(0, np.float32)
    found = Found(dup, ["exact"] * len(exact) + ["copy"] * int(copy.sum()),
                  np.concatenate([np.ones(len(exact), np.float32), scored.scores[copy]]),
                  np.concatenate([exact_cos, scored.cosines[copy]]).astype(np.float32), group_pairs(len(unit), dup))
    close = ~copy & (scored.cosines >= similar)
    found.similar, found.similar_cosines = scored.pairs[close], scored.cosines[close]
    return found
