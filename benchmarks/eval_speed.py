"""Eval suite: seconds of `edgessl eval` with the probe as it was (REFERENCE: float64, the whole L2 grid, every
labelled image cross-validated) against the current one (PROBE), on the same run and the same features, and the
difference of every top-1 in eval.json.

Setting (the issue's): CIFAR-10, 5,000 labelled training images (500 per class) and the 5,000 shared test images at
32 px, a mobilenetv3_small encoder (1,024-d features) pretrained for 1 epoch, `--labels-per-class 10,all --seeds 3
--baseline random`, features recomputed by each command (no cache).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import edgessl
from edgessl.evaluate import linear
from edgessl.workflows.eval import evaluate_encoder


def _eval(run_dir: Path, train: Path, test: Path, lpc: str, seeds: int, settings) -> tuple[float, list[dict]]:
    linear.PROBE, saved = settings, linear.PROBE
    try:
        t0 = time.time()
        result = evaluate_encoder(run_dir, train, test, labels_per_class=lpc, seeds=seeds, baseline="random",
                                  cache=False, console=Console(quiet=True), quiet=True)
        return time.time() - t0, result.results
    finally:
        linear.PROBE = saved


def suite_eval(args) -> list[dict[str, Any]]:
    from benchmarks.datasets import cifar10, stratified_subset

    train, test = cifar10(per_class=500)
    if args.tiny:
        train = stratified_subset(train, 6, 0, "cifar10-train-eval-tiny")
        test = stratified_subset(test, 3, 0, "cifar10-test-eval-tiny")
    lpc, seeds = ("2,all", 1) if args.tiny else ("10,all", 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = edgessl.pretrain(data=str(train), out=str(Path(tmp) / "run"), epochs=1, image_size=32, quiet=True,
                               eval_every=0).run_dir
        for name, settings in (("before", linear.REFERENCE), ("after", linear.PROBE)):
            load = os.getloadavg()[0]
            repeats = 1 if name == "before" or args.tiny else 3  # the machine's speed varies by +-20 %: a median
            runs = [_eval(run, train, test, lpc, seeds, settings) for _ in range(repeats)]
            seconds, results = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            rows.append({"probe": name, "settings": {"dtype": str(settings.dtype), "patience": settings.patience,
                                                     "max_cv_images": settings.max_cv_images,
                                                     "cv_max_iter": settings.cv_max_iter},
                         "seconds": seconds, "seconds_runs": [r[0] for r in runs], "load_average_1min": load,
                         "threads": torch.get_num_threads(), "labels_per_class": lpc, "seeds": seeds,
                         "n_train": results[0]["n_train"] if results else 0, "results": results})
            print(f"eval {name}: {seconds:.1f} s ({', '.join(f'{r[0]:.1f}' for r in runs)})", flush=True)
    return rows


def top1_differences(rows: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(row key, top-1 before, top-1 after) for every eval.json row of the two runs."""
    def key(r):
        k = "" if r["k"] is None else f" k={r['k']}"
        return f"{r['encoder']} {r['protocol']}{k} lpc={r['labels_per_class']} seed={r['seed']}"

    before = {key(r): r["top1"] for r in rows[0]["results"]}
    after = {key(r): r["top1"] for r in rows[1]["results"]}
    return [(k, before[k], after[k]) for k in before if k in after]
