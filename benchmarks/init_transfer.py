"""Init suite: does `--init RUN` carry what one folder taught to another? `python -m benchmarks.run init [--tiny]`.

mobilenetv3_small at 32 px (stride-1 stem). Source: pretrained on the shared emoji training images (1,529) for
`--epochs`. Target: a CIFAR-10 subset of 5,000 training images (500 per class), trained for `--epochs` either from
scratch or with `--init <the emoji run>` (the encoder and head continue, the bank is new), both with the same seed,
batch and schedule; kNN (k = 20 and 200, t = 0.1) of the online monitor against the 5,000 CIFAR-10 test images after
every epoch. The untrained network's kNN is the epoch-0 point of the scratch curve.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import edgessl
from benchmarks.common import run_line


def _curve(run) -> list[dict[str, Any]]:
    return [{"epoch": h["epoch"], "knn_top1": h.get("knn_top1"), "knn_top1_k200": h.get("knn_top1_k200"),
             "seconds": h["seconds"]} for h in run.history]


def suite_init(args) -> list[dict[str, Any]]:
    from benchmarks.datasets import cifar10, emoji, stratified_subset

    source, _ = emoji()
    train, test = cifar10(per_class=500)
    epochs = 1 if args.tiny else args.epochs
    if args.tiny:
        source = stratified_subset(source, 4, 0, "emoji-train-tiny")
        train = stratified_subset(train, 4, 0, "cifar10-train-tiny")
        test = stratified_subset(test, 2, 0, "cifar10-test-tiny")
    common = dict(backbone="mobilenetv3_small", image_size=32, epochs=epochs, quiet=True, seed=0,
                  batch_size=8 if args.tiny else 128)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()[0]
        src = edgessl.pretrain(data=str(source), out=str(Path(tmp) / "emoji"), eval_every=0, **common)
        rows.append({"run": "source: emoji", "data": str(source), "init": None, "load_average_1min": load,
                     "curve": _curve(src)})
        for label, init in (("CIFAR-10 5k from scratch", None), ("CIFAR-10 5k --init emoji run", str(src.run_dir))):
            load = os.getloadavg()[0]
            run = edgessl.pretrain(data=str(train), val=str(test), labels_from_folders=True, init=init,
                                   out=str(Path(tmp) / label.split()[-1]), **common)
            rows.append({"run": label, "data": str(train), "init": "emoji run" if init else None,
                         "load_average_1min": load, "curve": _curve(run)})
            print(f"init {label}: kNN {rows[-1]['curve'][-1]['knn_top1']}", flush=True)
    return rows


def init_section(rec: dict[str, Any]) -> str:
    rows = [r for r in rec["rows"] if r["init"] is not None or "scratch" in r["run"]]
    out = ["## Warm start: `--init RUN` on another folder\n",
           f"{run_line(rec)}. mobilenetv3_small at 32 px, batch 128, {rec['epochs']} epochs on the emoji training "
           "images, then the same number of epochs on 5,000 CIFAR-10 training images from scratch or with `--init` "
           "of the emoji run; kNN@20 / kNN@200 against the 5,000 CIFAR-10 test images after each epoch.\n"]
    epochs = sorted({p["epoch"] for r in rows for p in r["curve"]})
    shown = [e for e in epochs if e in (1, 2, 5, 10) or e == epochs[-1]]
    out += ["| CIFAR-10 5k run | " + " | ".join(f"epoch {e}" for e in shown) + " |",
            "|---|" + "---|" * len(shown)]
    for r in rows:
        by = {p["epoch"]: p for p in r["curve"]}
        cells = [f"{by[e]['knn_top1']:.3f} / {by[e]['knn_top1_k200']:.3f}" if e in by and by[e]["knn_top1"] is not None
                 else "-" for e in shown]
        out.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
