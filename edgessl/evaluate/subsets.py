"""Stratified few-label subsets and stratified train/held-out splits, reproducible by seed.

Randomness: class c under seed s is shuffled by its own generator keyed by (s, c, purpose), so a subset does not
depend on the other classes, the order of the calls or the machine. Subsets of one seed are nested: the 5 images
per class drawn under seed s contain the 1 image drawn under seed s, and so on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edgessl.seeding import keyed_generator

_SUBSET, _SPLIT = 0x5B5E7, 0x5B117


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """labels: (N,) long -> (C,) long images per class."""
    return torch.bincount(labels.long(), minlength=num_classes)


def _shuffled_members(labels: Tensor, c: int, *key: int) -> Tensor:
    """Indices of class c in labels (N,), in the order of a permutation keyed by `key` -> (n_c,) long."""
    members = (labels == c).nonzero(as_tuple=True)[0]
    return members[torch.randperm(len(members), generator=keyed_generator(*key, c))]


def stratified_subset(labels: Tensor, per_class: int | None, seed: int) -> Tensor:
    """Indices of `per_class` images of every class (all of a class's images when it has fewer; all images
    when per_class is None), drawn without replacement under `seed`.

    labels: (N,) long -> (M,) long, sorted ascending, M = sum_c min(per_class, n_c)."""
    if per_class is None:
        return torch.arange(len(labels))
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, not {per_class}")
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    picked = [_shuffled_members(labels, c, seed, _SUBSET)[:per_class] for c in range(num_classes)]
    return torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.long)


def short_classes(labels: Tensor, per_class: int | None, num_classes: int) -> dict[int, int]:
    """{class: images it has} for the classes with fewer than `per_class` images (empty for None)."""
    if per_class is None:
        return {}
    counts = class_counts(labels, num_classes)
    return {c: int(n) for c, n in enumerate(counts.tolist()) if n < per_class}


def held_out_count(n: int, fraction: float) -> int:
    """Images of a class of n that a split by `fraction` holds out: round(fraction * n) (halves up), at least 1
    and at most n - 1, so that both sides keep the class; 0 when n < 2 or fraction <= 0."""
    if n < 2 or fraction <= 0:
        return 0
    return min(n - 1, max(1, math.floor(fraction * n + 0.5)))


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split every class by `fraction` (see held_out_count) under `seed`.

    labels: (N,) long -> (kept (N - H,), held_out (H,)), both long, sorted ascending, disjoint, covering 0..N-1."""
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    kept, held = [], []
    for c in range(num_classes):
        members = _shuffled_members(labels, c, seed, _SPLIT)
        h = held_out_count(len(members), fraction)
        held.append(members[:h])
        kept.append(members[h:])
    empty = torch.zeros(0, dtype=torch.long)
    cat = lambda parts: torch.cat(parts).sort().values if parts else empty  # noqa: E731
    return cat(kept), cat(held)
