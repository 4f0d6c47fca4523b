"""The decision rule of copies, chosen on synthetic copies planted in the user's folder: the lowest copy-score
threshold whose estimated precision reaches the target (pure functions on the calibration's scores;
edgessl.evaluate.copies computes the scores, edgessl.workflows.embed wires them)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass
class Rule:
    """A pair is a copy when its copy score >= threshold. The estimates come from the calibration: recall over the
    planted copies, precision at PREVALENCE (see estimate), how many planted copies, the folder's own pairs above
    the threshold (real copies and any look-alikes), and whether the target precision was reached. precision_low:
    the precision if the `unsure` planted copies' matches above the threshold, images the calibration took for
    copies already in the folder on the folder's own score alone, are look-alikes (see with_doubt)."""

    threshold: float
    precision: float
    recall: float
    planted: int
    folder_pairs: int
    target: float
    reached: bool
    chosen: str  # "auto" or "given"
    precision_low: float | None = None  # None until with_doubt: then `precision` when unsure is 0
    unsure: int = 0
    limit: Limit | None = None  # what held an "auto" threshold up (see limiting); None for a given one


@dataclass(frozen=True)
class Limit:
    """The look-alike that held an "auto" threshold up: the highest wrong pair below it (index into `wrong`, its
    score, and its two folder rows), and the rule without that one pair (its threshold and
    recall; it reaches the target too, as every threshold that did still does): how much the threshold rests on one
    pair of images."""

    index: int
    score: float
    threshold_without: float
    recall_without: float
    pair: tuple[int, int]


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
    highest threshold of the best precision and its recall (no more risk than the estimate needs). Candidates:
    every calibration score (planted copies and their look-alikes: where the estimate changes), and 1.0, but none
    below the lowest planted copy: a lower threshold finds no more of them and only adds risk (in a small folder
    whose look-alikes all scored far below the copies, the folder's lowest pair, at a negative score, had reached
    the target on no evidence and was flagged). The folder's own pairs are no candidates: between a look-alike and
    the next planted copy the estimate is the same, and the lowest such threshold had landed exactly on one of the
    folder's pairs, flagging it on no evidence (two different flags of the demo, under a weak encoder)."""
    values = np.concatenate([true, wrong, [1.0]]).astype(np.float64)
    candidates = np.unique(values[np.isfinite(values)])
    found = true[np.isfinite(true)]
    if len(found):
        candidates = candidates[candidates >= min(float(found.min()), 1.0)]
    own = own[np.isfinite(own)]
    best = None
    for t in candidates:  # ascending: the first that reaches the target has the highest recall
        p, r, k = estimate(float(t), true, wrong, own)
        if p >= target and r > 0:
            return Rule(float(t), p, r, len(true), k, target, True, "auto")
        if best is None or p > best.precision or (p == best.precision and r == best.recall):  # the highest such t
            best = Rule(float(t), p, r, len(true), k, target, False, "auto")
    return best


def with_doubt(rule: Rule, true: np.ndarray, wrong: np.ndarray, doubtful: np.ndarray) -> Rule:
    """The rule with its pessimistic precision: estimate()'s precision with `doubtful` (wrong, also counting the
    pairs excused as copies already in the folder on the folder's own score alone) in place of `wrong`, and how many
    planted copies that moves (unsure). The threshold is still chosen on `wrong`: counting those pairs as wrong
    would treat every real copy the folder holds as a look-alike (measured with 50 planted copies and 10-epoch
    encoders, recall fell 0.84 -> 0.56 on emoji, 1.00 -> 0.84 on CIFAR-10, 0.94 -> 0.88 on NEU-DET), so the
    estimate gives both ends instead."""
    low = estimate(rule.threshold, true, doubtful, np.zeros(0))[0]
    unsure = int((doubtful >= rule.threshold).sum()) - int((wrong >= rule.threshold).sum())
    return replace(rule, precision_low=min(low, rule.precision), unsure=max(unsure, 0))


def limiting(rule: Rule, true: np.ndarray, wrong: np.ndarray, own: np.ndarray, pairs: np.ndarray) -> Rule:
    """The rule with its limit: the highest wrong score below an "auto" threshold, and the rule chosen again without
    it. With 400 planted copies, precision 0.95 and PREVALENCE 3 % leave no wrong pair above the threshold, so the
    threshold is the first planted copy's score above that one look-alike, wherever the sample happened to meet it; the
    rule without it says how far the threshold would fall. pairs (Q, 2): each wrong score's folder rows (original,
    other image), for the output to name the two images. A given threshold, one short of the target, or one whose
    recall would not rise without that pair (it does not fall, or falls past no planted copy: every copy already
    scores above the look-alike, far below the threshold, and a lower threshold would only add risk): the rule
    unchanged."""
    below = np.flatnonzero(np.isfinite(wrong) & (wrong < rule.threshold))
    if rule.chosen != "auto" or not rule.reached or not len(below):
        return rule
    i = int(below[np.argmax(wrong[below])])
    other = choose_rule(true, np.delete(wrong, i), own, rule.target)
    if other.recall <= rule.recall:  # the threshold does not fall without the pair, or falls past no copy
        return rule
    pair = (int(pairs[i, 0]), int(pairs[i, 1]))
    return replace(rule, limit=Limit(i, float(wrong[i]), other.threshold, other.recall, pair))


def rule_at(threshold: float, true: np.ndarray, wrong: np.ndarray, own: np.ndarray, target: float = 0.95) -> Rule:
    """The estimates of a threshold the user gave."""
    p, r, k = estimate(float(threshold), true, wrong, own[np.isfinite(own)])
    return Rule(float(threshold), p, r, len(true), k, target, p >= target and r > 0, "given")  # r 0: no evidence
