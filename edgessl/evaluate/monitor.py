"""The online kNN monitor of pretraining: weighted kNN (k = 20 and 200, t = 0.1) on backbone features of labelled
images, after an epoch. Memory and queries (knn_sets, shared with the per-width report): --val against labelled
training images, leave-one-out inside --val, or leave-one-out on the labelled training images.

Cost: features of the memory (and --val) images on the training device, and one top-200 search per query. Above
--monitor-queries (default 5,000) queries, a fixed random subset of that many is classified every epoch (seeded by
--seed, so epochs compare like for like); the memory always holds every labelled image. At N = 20,000 this divides
the search by four: see benchmarks/README.md (loader suite) for the seconds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgessl.data.folder import ImageSet
from edgessl.evaluate.features import extract_features
from edgessl.evaluate.knn import KNN_K, KNN_T, knn_top1s
from edgessl.evaluate.labelled import map_test_labels
from edgessl.seeding import keyed_generator


@dataclass
class KnnSets:
    """Which labelled images a kNN classifies (query) against which (memory): query_labels (Q,) are in the
    memory's classes; loo: the query is the memory itself, each image left out of its own vote."""

    memory: ImageSet
    query: ImageSet
    query_labels: torch.Tensor
    loo: bool

    def describe(self) -> str:
        if self.loo:
            return f"leave-one-out on {len(self.memory)} labelled images"
        return f"{len(self.query)} test images against {len(self.memory)} labelled images"


def knn_sets(labelled: ImageSet | None, test: ImageSet | None, what: str = "--val",
             against: str = "the training folders") -> KnnSets | None:
    """labelled: labelled training images (None: none); test: labelled held-out images (None: none). Both: test
    against labelled (UserError when `what` has a class the training images lack); one: leave-one-out on it;
    neither: None."""
    if labelled is not None and test is not None:
        remap = map_test_labels(labelled.classes, test.classes, what, against)
        return KnnSets(labelled, test, remap[test.labels], False)
    only = labelled if labelled is not None else test
    return None if only is None else KnnSets(only, only, only.labels, True)


def query_subset(n: int, max_queries: int, seed: int) -> torch.Tensor | None:
    """(max_queries,) sorted rows of a seeded random subset of range(n), or None (all) when n <= max_queries or
    max_queries is 0."""
    if not max_queries or n <= max_queries:
        return None
    return torch.randperm(n, generator=keyed_generator(seed, 0x6E0))[:max_queries].sort().values


class Monitor:
    """Online kNN (k = 20 and 200, t = 0.1) on backbone features when labels are available. train: the training
    images (their labels, if any, make the memory); val: the --val images. max_queries: classify at most this many
    (a subset seeded by `seed`; 0 = all). off: why there is no monitor when train is None (the banner says it)."""
    def __init__(self, train: ImageSet | None, val: ImageSet | None, max_queries: int = 0, seed: int = 0,
                 off: str = "no labels: --labels-from-folders for class subfolders, or --val"):
        labelled = train if train is not None and train.labels is not None else None
        self.sets = knn_sets(labelled, val) if train is not None else None
        self.subset = None if self.sets is None else query_subset(len(self.sets.query), max_queries, seed)
        self.off = off if train is None else "no labels: --labels-from-folders for class subfolders, or --val"

    @property
    def active(self) -> bool:
        return self.sets is not None

    def describe(self) -> str:
        if self.sets is None:
            return f"off ({self.off})"
        s = self.sets
        queries = len(s.query) if self.subset is None else f"{len(self.subset)} of {len(s.query)}"
        voters = len(s.memory) - (1 if s.loo else 0)
        few = (f" (k = {KNN_K[0]} covers all {voters} other images: each score is then a vote of every class, and "
               "means little)") if voters <= KNN_K[0] else (
            f" (k = {KNN_K[1]} covers all {voters} other images: kNN@{KNN_K[1]} is then a vote of every class, and "
            "means little)") if voters <= KNN_K[1] else ""
        if s.loo:
            return f"leave-one-out on {queries} labelled images{few}"
        return f"{queries} --val images against {len(s.memory)} training images{few}"

    def __call__(self, backbone, device, mean, std) -> dict[str, float]:
        s = self.sets
        mem = extract_features(backbone, s.memory, mean, std, device, keep_on_device=True)
        labels, exclude = s.query_labels, s.loo
        if s.loo:
            qry = mem if self.subset is None else mem[self.subset.to(mem.device)]
            exclude = True if self.subset is None else self.subset
        else:
            qry = extract_features(backbone, s.query, mean, std, device, keep_on_device=True, rows=self.subset)
        if self.subset is not None:
            labels = labels[self.subset]
        top1 = knn_top1s(qry, labels, mem, s.memory.labels, len(s.memory.classes), KNN_K, KNN_T, exclude)
        return {key: top1[k] for k, key in zip(KNN_K, ("knn_top1", "knn_top1_k200"), strict=True)}
