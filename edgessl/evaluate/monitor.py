"""The online kNN monitor of pretraining: weighted kNN (k = 20 and 200, t = 0.1) on backbone features of labelled
images, after an epoch. Memory and queries: --val against labelled training images, leave-one-out inside --val, or
leave-one-out on the labelled training images."""

from __future__ import annotations

import torch

from edgessl.data.folder import ImageSet
from edgessl.errors import UserError
from edgessl.evaluate.features import extract_features
from edgessl.evaluate.knn import KNN_K, KNN_T, knn_top1s
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


class Monitor:
    """Online kNN (k = 20 and 200, t = 0.1) on backbone features when labels are available."""
    def __init__(self, train: ImageSet | None, val: ImageSet | None):
        self.memory = None
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

    @property
    def active(self) -> bool:
        return self.memory is not None

    def describe(self) -> str:
        if self.memory is None:
            return "off (no labels)"
        if self.loo:
            return f"leave-one-out on {len(self.query)} labelled images"
        return f"{len(self.query)} --val images against {len(self.memory)} training images"

    def __call__(self, backbone, device, mean, std) -> dict[str, float]:
        mem = extract_features(backbone, self.memory, mean, std, device)
        qry = mem if self.loo else extract_features(backbone, self.query, mean, std, device)
        top1 = knn_top1s(qry, self.query_labels, mem, self.memory.labels, self.num_classes, KNN_K, KNN_T, self.loo)
        return {key: top1[k] for k, key in zip(KNN_K, ("knn_top1", "knn_top1_k200"), strict=True)}
