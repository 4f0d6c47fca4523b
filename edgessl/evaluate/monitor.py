"""The online kNN monitor of pretraining: weighted kNN (k = 20 and 200, t = 0.1) on backbone features of labelled
images, after an epoch. Memory and queries: --val against labelled training images, leave-one-out inside --val, or
leave-one-out on the labelled training images.

Cost: features of the memory (and --val) images on the training device, and one top-200 search per query. Above
--monitor-queries (default 5,000) queries, a fixed random subset of that many is classified every epoch (seeded by
--seed, so epochs compare like for like); the memory always holds every labelled image. At N = 20,000 this divides
the search by four: see benchmarks/README.md (loader suite) for the seconds."""

from __future__ import annotations

import torch

from edgessl.data.folder import ImageSet
from edgessl.errors import UserError
from edgessl.evaluate.features import extract_features
from edgessl.evaluate.knn import KNN_K, KNN_T, knn_top1s
from edgessl.seeding import keyed_generator
from edgessl.slim.api import report_table, width_report
from edgessl.train.loop import Evaluation


def standard_evaluation():
    """The Evaluation the API hands the training loop: this kNN monitor, and after a --widths run the per-width
    report (widths.json, widths.png and a table)."""
    return Evaluation(monitor=Monitor, widths_report=widths_report)


def widths_report(run_dir, widths, labelled, val, device, console) -> None:
    """Per-width params, MACs, latency, accuracy -> widths.json + widths.png (slimmed encoders in width-<w>/)."""
    report = width_report(run_dir, widths, labelled=labelled, test=val, device=device, console=console)
    if console is not None:
        console.print(report_table(report))


def query_subset(n: int, max_queries: int, seed: int) -> torch.Tensor | None:
    """(max_queries,) sorted rows of a seeded random subset of range(n), or None (all) when n <= max_queries or
    max_queries is 0."""
    if not max_queries or n <= max_queries:
        return None
    return torch.randperm(n, generator=keyed_generator(seed, 0x6E0))[:max_queries].sort().values


class Monitor:
    """Online kNN (k = 20 and 200, t = 0.1) on backbone features when labels are available. max_queries: classify
    at most this many (a subset seeded by `seed`; 0 = all)."""
    def __init__(self, train: ImageSet | None, val: ImageSet | None, max_queries: int = 0, seed: int = 0):
        self.memory = None
        self.subset: torch.Tensor | None = None
        if train is None:
            return
        if val is not None and train.labels is not None:
            missing = sorted(set(val.classes) - set(train.classes))
            if missing:
                raise UserError(f"--val has classes that the training folders lack: {', '.join(missing[:5])}.")
            self.memory, self.query, self.loo = train, val, False
            remap = torch.tensor([train.classes.index(c) for c in val.classes])
            self.query_labels = remap[val.labels]
        elif val is not None:
            self.memory, self.query, self.loo = val, val, True
            self.query_labels = val.labels
        elif train.labels is not None:
            self.memory, self.query, self.loo = train, train, True
            self.query_labels = train.labels
        if self.memory is not None:
            self.num_classes = len(self.memory.classes)
            self.subset = query_subset(len(self.query), max_queries, seed)

    @property
    def active(self) -> bool:
        return self.memory is not None

    def describe(self) -> str:
        if self.memory is None:
            return "off (no labels)"
        queries = len(self.query) if self.subset is None else f"{len(self.subset)} of {len(self.query)}"
        if self.loo:
            return f"leave-one-out on {queries} labelled images"
        return f"{queries} --val images against {len(self.memory)} training images"

    def __call__(self, backbone, device, mean, std) -> dict[str, float]:
        mem = extract_features(backbone, self.memory, mean, std, device, keep_on_device=True)
        labels, exclude = self.query_labels, self.loo
        if self.loo:
            qry = mem if self.subset is None else mem[self.subset.to(mem.device)]
            exclude = True if self.subset is None else self.subset
        else:
            qry = extract_features(backbone, self.query, mean, std, device, keep_on_device=True, rows=self.subset)
        if self.subset is not None:
            labels = labels[self.subset]
        top1 = knn_top1s(qry, labels, mem, self.memory.labels, self.num_classes, KNN_K, KNN_T, exclude)
        return {key: top1[k] for k, key in zip(KNN_K, ("knn_top1", "knn_top1_k200"), strict=True)}
